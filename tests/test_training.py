import os

import torch

from train_gpt2 import GPT, GPTConfig, DataLoaderLite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = os.path.join(ROOT, "input.txt")


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=2, n_head=4, n_embd=256))
    x, y = DataLoaderLite(2, 16, INPUT).next_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(150):  # bounded: a model that cannot memorise 32 tokens is broken
        optimizer.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < 0.5:
            break
    assert losses[0] > 10.0
    assert losses[-1] < 0.5, f"still {losses[-1]:.3f} after {len(losses)} steps"
