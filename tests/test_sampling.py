import torch

from conftest import error_of, NO_SHAPE, SMALL, run
from tokenizer import gpt2_encoding
from train_gpt2 import GPT, GPTConfig, sample


def test_generate_is_reproducible_with_a_seeded_generator(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint()).eval()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    a = model.generate(idx, 20, top_k=10, generator=torch.Generator().manual_seed(7))
    b = model.generate(idx, 20, top_k=10, generator=torch.Generator().manual_seed(7))
    c = model.generate(idx, 20, top_k=10, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 23)
    assert torch.equal(a[:, :3], idx)  # the prompt comes back first
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_only_picks_from_the_top_k(hf_checkpoint):
    k = 5
    model = GPT.from_pretrained(hf_checkpoint(n_positions=16)).eval()
    idx = torch.tensor([[10, 20]] * 4)
    out = model.generate(idx, 30, top_k=k, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 32)  # longer than block_size 16: the context is cropped
    for t in range(2, out.size(1)):
        with torch.no_grad():
            logits, _ = model(out[:, max(0, t - 16):t])
        topk = torch.topk(logits[:, -1, :], k).indices
        assert (topk == out[:, t:t + 1]).any(dim=1).all(), f"step {t} left the top {k}"


def test_main_prints_five_continuations_of_the_prompt(hf_checkpoint, tmp_path):
    path = hf_checkpoint(vocab_size=50257, n_embd=16)  # the prompt's ids need the full vocabulary
    out = run(["train_gpt2.py", *NO_SHAPE, "--init_from", path, "--max_steps", "1", "--seq_len", "32",
               "--total_batch_size", "64", "--log_dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    # 4 samples at the last step, from the text's first line (they may hold newlines: count the prompts)
    assert [out.stdout.count(f"\nsample {i}: First Citizen:\n") for i in range(5)] == [1, 1, 1, 1, 0]


def test_main_samples_from_a_random_model_on_the_chosen_device(tmp_path):
    out = run(["train_gpt2.py", *SMALL, "--init_from", "scratch", "--device", "cpu", "--max_steps", "1",
               "--log_dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    assert "using device: cpu" in out.stdout
    assert out.stdout.count(": First Citizen:\n") == 4


def test_generate_never_returns_padded_vocabulary_ids():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # make the 47 padded rows the most likely "tokens" by far
        model.lm_head.weight[50257:] = model.lm_head.weight[50257:].sign() * 10
        logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits[0, -1].argmax().item() >= 50257  # unmasked, they would win
    out = model.generate(torch.tensor([[15496, 11]] * 8), 40, generator=torch.Generator().manual_seed(0))
    assert out.max().item() < 50257
    text = gpt2_encoding().decode(out[0].tolist())  # a padded id would raise KeyError here
    assert text.startswith("Hello,") and len(text) > len("Hello,")


def test_an_empty_prompt_samples_from_endoftext():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    texts = sample(model, "cpu", num_samples=3, max_new_tokens=6, seed=5, prompt="")
    out = model.generate(torch.tensor([[50256]] * 3), 6, generator=torch.Generator().manual_seed(5))
    enc = gpt2_encoding()
    assert texts == [enc.decode(row[1:].tolist()) for row in out]  # <|endoftext|> itself not printed
    assert len(set(texts)) > 1


def test_the_kv_cache_samples_exactly_the_tokens_of_the_uncached_path_for_a_seed_with_far_less_work():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # a model whose picks are not uniform: its weights scaled up, so the tokens depend on the logits
        for p in model.parameters():
            p.mul_(8)
    positions = []  # how many positions the first block computes in each forward pass
    model.transformer.h[0].register_forward_pre_hook(lambda module, args: positions.append(args[0].size(1)))
    idx = torch.tensor([[50256, 464, 3290, 257, 1110]] * 4)  # 4 rows of a 5-token prompt
    for new in (12, 30):  # within the context of 24, and past it (the window then slides)
        runs = {}
        for cached in (True, False):
            positions.clear()
            out = model.generate(idx, new, top_k=50, generator=torch.Generator().manual_seed(42), kv_cache=cached)
            runs[cached] = out, list(positions)
        (with_cache, seen), (without, work) = runs[True], runs[False]
        assert torch.equal(with_cache, without), new
        assert len(set(without[:, 5:].flatten().tolist())) > 10  # the samples vary: equal by more than luck
        assert work == [min(5 + i, 24) for i in range(new)]  # uncached: the whole prefix every time
        # cached: the prompt once, then one position a token, until the context is full
        assert seen == [5] + [1] * 19 + [24] * (new - 20) if new > 20 else seen == [5] + [1] * (new - 1)


def test_cached_logits_are_the_full_pass_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=4, n_embd=32)).eval()
    idx = torch.randint(0, 100, (3, 10))
    with torch.no_grad():
        full, _ = model(idx)
        caches = [[] for _ in model.transformer.h]
        first, _ = model(idx[:, :6], pos=torch.arange(0, 6), caches=caches)
        steps = [model(idx[:, t:t + 1], pos=torch.arange(t, t + 1), caches=caches)[0] for t in range(6, 10)]
    assert caches[0][0].shape == (3, 4, 10, 8)  # keys: batch, heads, the 10 tokens, head size
    assert torch.allclose(torch.cat([first, *steps], dim=1), full, atol=1e-5)


def test_too_many_samples_for_the_memory_is_one_line_that_says_to_ask_for_fewer(hf_checkpoint, monkeypatch, capsys):
    import sample
    def out_of_memory(*args, **kwargs):  # as a device answers 100,000 rows at once
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB. GPU 0 has 79 GiB")
    monkeypatch.setattr(sample, "sample", out_of_memory)
    path = hf_checkpoint(vocab_size=50257, n_embd=16, n_positions=64)
    assert error_of(sample.main, ["-m", path, "-d", "cpu", "--num_samples", "100000"]) == \
        "error: out of memory sampling 100000 rows at once (CUDA out of memory): pass a smaller --num_samples"
