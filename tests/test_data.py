import os

import tiktoken
import torch

from train_gpt2 import first_batch, load_text_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = os.path.join(ROOT, "input.txt")


def test_input_txt_tokenizes_with_gpt2():
    tokens = load_text_tokens(INPUT)
    assert tokens.dtype == torch.long
    with open(INPUT, encoding="utf-8") as f:
        text = f.read()
    assert len(text) == 1115394  # the bytes are ASCII: characters == bytes
    assert tokens[:8].tolist() == tiktoken.get_encoding("gpt2").encode(text[:40])[:8]
    assert len(tokens) == 338025


def test_first_batch_targets_are_inputs_shifted_by_one():
    tokens = load_text_tokens(INPUT)
    B, T = 4, 32
    x, y = first_batch(tokens, B, T)
    assert x.shape == y.shape == (B, T)
    assert torch.equal(x.reshape(-1), tokens[:B * T])
    assert torch.equal(y.reshape(-1), tokens[1:B * T + 1])
    assert torch.equal(y[:, :-1], x[:, 1:])  # within a row
    assert torch.equal(y[:-1, -1], x[1:, 0])  # across rows: the stream continues


def test_untrained_loss_on_real_text_is_about_ln_vocab():
    from train_gpt2 import GPT, GPTConfig
    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=4, n_embd=64))
    x, y = first_batch(load_text_tokens(INPUT), B=4, T=64)
    with torch.no_grad():
        _, loss = model(x, y)
    print(loss.item())
    assert 10.5 < loss.item() < 11.2  # -ln(1/50257) = 10.82
