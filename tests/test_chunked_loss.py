"""--loss_chunks: the output layer and the loss in pieces give the plain step's loss and gradients."""
import pytest
import torch

from conftest import SMALL, assert_same_log
import train_gpt2
from machinery.chunked_loss import chunked_cross_entropy
from train_gpt2 import GPT, GPTConfig


def loss_and_grads(model, x, y, chunks, bf16=False):
    model.zero_grad(set_to_none=True)
    model.loss_chunks = chunks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, loss = model(x, y)
    loss.backward()
    return logits, loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunks", [2, 7, 50])  # 7 does not divide the 48 positions; 50 is more chunks than rows
def test_a_chunked_loss_equals_the_plain_one_and_so_do_every_weights_gradients(chunks):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=384, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(0, 384, (3, 16)), torch.randint(0, 384, (3, 16))
    logits, plain, grads = loss_and_grads(model, x, y, 1)
    none, chunked, chunked_grads = loss_and_grads(model, x, y, chunks)
    assert logits.shape == (3, 16, 384) and none is None  # chunked: no (B, T, vocab) logits are made
    assert abs(chunked - plain) < 1e-6, (chunked, plain)
    for name, g in grads.items():  # lm_head's (tied with wte) included: fp32, within rounding
        assert torch.allclose(chunked_grads[name], g, rtol=1e-5, atol=1e-7), name


def test_under_bf16_autocast_the_chunked_loss_computes_as_lm_head_would():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=384, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(0, 384, (3, 16)), torch.randint(0, 384, (3, 16))
    _, plain, grads = loss_and_grads(model, x, y, 1, bf16=True)
    _, chunked, chunked_grads = loss_and_grads(model, x, y, 4, bf16=True)
    _, fp32, _ = loss_and_grads(model, x, y, 1)
    assert abs(chunked - plain) < 1e-6 and abs(plain - fp32) > 1e-5  # the same bf16 matmuls, not fp32's
    for name, g in grads.items():
        error = ((chunked_grads[name] - g).norm() / g.norm()).item()
        # lm_head's (tied with wte): a sum of bf16 pieces, off by bf16's rounding (0.2% here, bf16 vs fp32 is 0.3%);
        # every other gradient flows back through the hidden states' gradient, which comes out the same
        assert error < 5e-3 if name == "transformer.wte.weight" else error == 0, (name, error)


def test_without_gradients_the_chunked_loss_is_the_plain_loss():
    torch.manual_seed(0)
    x, w, t = torch.randn(10, 8), torch.randn(30, 8), torch.randint(0, 30, (10,))
    with torch.no_grad():
        loss = chunked_cross_entropy(x, w, t, 3)
    assert loss.grad_fn is None and abs(loss.item() - torch.nn.functional.cross_entropy(x @ w.t(), t).item()) < 1e-6


def test_a_run_with_the_loss_in_chunks_logs_what_the_plain_run_logs(tmp_path):
    args = [*SMALL, "--max_steps", "4", "--eval_every", "2", "--val_steps", "2", "--sample_every", "1000", "--bf16", "0",
            "--device", "cpu"]
    train_gpt2.main([*args, "--log_dir", str(tmp_path / "plain")])
    train_gpt2.main([*args, "--loss_chunks", "8", "--log_dir", str(tmp_path / "chunked")])
    assert_same_log(tmp_path / "chunked", tmp_path / "plain", tol=2e-6)
