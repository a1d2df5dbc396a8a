import os

import pytest
import tiktoken
import torch

from train_gpt2 import DataLoaderLite, load_text_tokens

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
    x, y = DataLoaderLite(B, T, INPUT).next_batch()
    assert x.shape == y.shape == (B, T)
    assert torch.equal(x.reshape(-1), tokens[:B * T])
    assert torch.equal(y.reshape(-1), tokens[1:B * T + 1])
    assert torch.equal(y[:, :-1], x[:, 1:])  # within a row
    assert torch.equal(y[:-1, -1], x[1:, 0])  # across rows: the stream continues


def test_loader_batches_are_consecutive_and_wrap(tmp_path, capsys):
    path = tmp_path / "small.txt"
    path.write_text(" a" * 100)  # " a" is one GPT-2 token: 100 tokens
    tokens = load_text_tokens(str(path))
    assert len(tokens) == 100
    B, T = 3, 10  # 30 tokens a batch: batches start at 0, 30, 60; 90 + 31 > 100 wraps
    loader = DataLoaderLite(B, T, str(path))
    assert "1 epoch = 3 batches" in capsys.readouterr().out
    seen = [loader.next_batch() for _ in range(4)]
    for k, start in enumerate((0, 30, 60, 0)):
        x, y = seen[k]
        assert torch.equal(x.reshape(-1), tokens[start:start + 30])
        assert torch.equal(y.reshape(-1), tokens[start + 1:start + 31])
    with pytest.raises(ValueError, match="fewer than one batch"):
        DataLoaderLite(10, 10, str(path))


def test_untrained_loss_on_real_text_is_about_ln_vocab():
    from train_gpt2 import GPT, GPTConfig
    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=4, n_embd=64))
    x, y = DataLoaderLite(4, 64, INPUT).next_batch()
    with torch.no_grad():
        _, loss = model(x, y)
    print(loss.item())
    assert 10.5 < loss.item() < 11.2  # -ln(1/50257) = 10.82
