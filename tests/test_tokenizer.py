import tiktoken

PROMPT = "Hello, I'm a language model,"
PROMPT_IDS = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # the lecture's prompt, as GPT-2 tokenizes it


def test_gpt2_encoding_offline_from_vendored_cache():
    from train_gpt2 import EOT, GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE
    enc = tiktoken.get_encoding("gpt2")
    assert enc.n_vocab == GPT2_VOCAB_SIZE == 50257
    assert enc.eot_token == EOT == 50256
    assert PADDED_VOCAB_SIZE == 50304 and PADDED_VOCAB_SIZE % 128 == 0
    assert enc.encode(PROMPT) == PROMPT_IDS
    assert enc.decode(PROMPT_IDS) == PROMPT
