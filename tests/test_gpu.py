"""What only a CUDA GPU can show: compile and bf16 train, fused AdamW, resume, sampling and HellaSwag compiled, the memory
estimate against torch.cuda.max_memory_allocated, --batch_size auto on a card made to look smaller, the chunked loss.

Skipped without CUDA (CI runs on the CPU). On a GPU: python -m pytest -m gpu tests/test_gpu.py, or gpu_check.py.
"""
import dataclasses
import re

import pytest
import torch

from conftest import HELLASWAG_20, INPUT, parse_args, read_log
import bench
import train_gpt2
from machinery import memory
from machinery.memory import choose_batch_size, memory_estimate
from machinery.world import World, init_device
from train_gpt2 import GPT, GPTConfig, PADDED_VOCAB_SIZE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# 4 blocks of 256 channels, 8 x 256 tokens a micro-batch, 2 a step: seconds a run on any GPU
RUN = ["--data", INPUT, "--hellaswag", "0", "--n_layer", "4", "--n_head", "4", "--n_embd", "256", "--batch_size", "8",
       "--seq_len", "256", "--total_batch_size", "4096", "--warmup_steps", "2", "--max_lr", "1e-3", "--eval_every", "5",
       "--val_steps", "2", "--val_batch_size", "8", "--sample_every", "1000", "--device", "cuda"]


def train_losses(log_dir):
    return [float(v) for _, kind, v in read_log(log_dir) if kind == "train"]


def test_a_compiled_bf16_run_learns_and_matches_the_eager_run_within_bf16_tolerance(tmp_path):
    for compiled in ("1", "0"):
        train_gpt2.main([*RUN, "--max_steps", "10", "--bf16", "1", "--compile", compiled, "--log_dir", str(tmp_path / compiled)])
    compiled, eager = train_losses(tmp_path / "1"), train_losses(tmp_path / "0")
    assert len(compiled) == 10 and compiled[-1] < compiled[0] - 2, compiled  # from 10.9 toward Shakespeare's ~7
    assert all(abs(a - b) < 0.02 for a, b in zip(compiled, eager)), (compiled, eager)


def test_fused_adamw_runs_on_cuda_also_after_resuming_a_cpu_checkpoint(tmp_path, monkeypatch):
    made = []
    configure = GPT.configure_optimizers
    monkeypatch.setattr(GPT, "configure_optimizers", lambda self, *a, **k: made.append(configure(self, *a, **k)) or made[-1])
    cpu = [*RUN[:-2], "--device", "cpu", "--bf16", "0", "--compile", "0", "--max_steps", "4", "--checkpoint_every", "2"]
    train_gpt2.main([*cpu, "--log_dir", str(tmp_path / "cpu")])
    assert [g["fused"] for g in made[-1].param_groups] == [False, False]  # the CPU's AdamW
    train_gpt2.main([*RUN, "--bf16", "0", "--compile", "0", "--max_steps", "4", "--checkpoint_every", "2",
                     "--resume", str(tmp_path / "cpu" / "model_00001.pt"), "--log_dir", str(tmp_path / "cuda")])
    optimizer = made[-1]
    assert [g["fused"] for g in optimizer.param_groups] == [True, True]  # this device's choice, not the checkpoint's
    assert all(s["exp_avg"].is_cuda for s in optimizer.state.values())
    assert abs(train_losses(tmp_path / "cuda")[-1] - train_losses(tmp_path / "cpu")[-1]) < 1e-3  # the same steps


def test_a_run_resumed_on_cuda_continues_the_uninterrupted_one(tmp_path, capsys):
    args = [*RUN, "--bf16", "0", "--compile", "0", "--max_steps", "6", "--checkpoint_every", "3"]
    train_gpt2.main([*args, "--log_dir", str(tmp_path / "whole")])
    train_gpt2.main([*args, "--resume", str(tmp_path / "whole" / "model_00002.pt"), "--log_dir", str(tmp_path / "cut")])
    assert "resuming at step 3" in capsys.readouterr().out
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(tmp_path / "cut")
    # fp32 with TF32 matmuls: not bit for bit (the GPU's kernels may sum in another order), but within 1e-4
    assert len(resumed) == 3 and all(abs(a - b) < 1e-4 for a, b in zip(whole[3:], resumed)), (whole, resumed)


def test_a_compiled_run_samples_and_scores_hellaswag(tmp_path, capsys):
    run = [a if a != "0" or RUN[i - 1] != "--hellaswag" else "1" for i, a in enumerate(RUN)]
    train_gpt2.main([*run, "--hellaswag_file", HELLASWAG_20, "--compile", "1", "--max_steps", "3", "--eval_every", "2",
                     "--log_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert re.search(r"HellaSwag accuracy: 0\.\d{4} over 20 examples", out) and out.count("sample ") >= 4
    assert [kind for _, kind, _ in read_log(tmp_path)].count("hella") == 2  # steps 0 and 2


def peak_of_steps(model, cfg, device, steps=2):
    """torch.cuda.max_memory_allocated over a few training steps (forward, backward, clip, AdamW) of model."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, "cuda")
    step_model = torch.compile(model) if cfg.compile else model
    x = torch.randint(0, 50257, (cfg.batch_size, cfg.seq_len + 1), device=device)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = step_model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


@pytest.mark.parametrize("compiled", [False, True])
def test_the_memory_estimate_is_within_15_percent_of_what_a_small_model_allocates(compiled):
    device = init_device("cuda")
    cfg = parse_args(["--n_layer", "6", "--n_head", "8", "--n_embd", "512", "--batch_size", "16", "--compile",
                      str(int(compiled)), "--bf16", "1"])
    config = GPTConfig(block_size=1024, vocab_size=PADDED_VOCAB_SIZE, n_layer=6, n_head=8, n_embd=512)
    model = GPT(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    estimate = sum(memory_estimate(config, n_params, cfg, 1, False, 1).values())
    measured = peak_of_steps(model, cfg, device)
    assert abs(estimate / measured - 1) < 0.15, (estimate / 2**30, measured / 2**30)


def test_batch_size_auto_on_a_card_made_to_look_like_40_gib_picks_what_fits(monkeypatch):
    device = init_device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    tried = []
    trial = memory.trial_step
    monkeypatch.setattr(memory, "trial_step", lambda model, B, *a: tried.append(B) or trial(model, B, *a))
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(40 * 2**30 / total, device)
    try:
        cfg = dataclasses.replace(parse_args(["--batch_size", "auto"]), bf16=True)  # GPT-2 124M, compiled
        model = GPT(GPTConfig(block_size=1024, vocab_size=PADDED_VOCAB_SIZE))
        lines = []
        chosen = choose_batch_size(cfg, World(device=device), model, log=lines.append)
        # compiled, B=64 needs 41.2 GiB (measured on an H200), 45 GiB with the tenth set aside: well over 40 GiB; B=32
        # about 21 GiB, 27 GiB with AdamW and the tenth: well under
        assert tried[:2] == [64, 32] and chosen == 32, (tried, lines)
        assert lines == ["--batch_size auto: 32 (the largest that ran a step here with 10% of the memory to spare, compiled)"]
        cfg.batch_size = chosen
        assert peak_of_steps(model, cfg, device, steps=1) < 40 * 2**30  # the real step at 32, with AdamW, fits
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


def test_the_chunked_loss_equals_the_plain_one_on_cuda_and_needs_less_memory():
    device = init_device("cuda")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=PADDED_VOCAB_SIZE, n_layer=2, n_head=4, n_embd=256)).to(device)
    x = torch.randint(0, 50257, (16, 1025), device=device)
    results = {}
    for chunks in (1, 8):
        model.zero_grad(set_to_none=True)
        model.loss_chunks = chunks
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        results[chunks] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, \
            torch.cuda.max_memory_allocated(device)
    (plain, grads, plain_peak), (chunked, chunked_grads, chunked_peak) = results[1], results[8]
    assert abs(plain - chunked) < 1e-4, (plain, chunked)
    for name, g in grads.items():
        assert ((chunked_grads[name] - g).norm() / g.norm()).item() < 1e-2, name
    assert chunked_peak < 0.6 * plain_peak, (chunked_peak / 2**30, plain_peak / 2**30)  # the logits were most of it


def test_the_kv_cache_computes_the_uncached_logits_and_samples_its_tokens_on_cuda():
    device = init_device("cuda")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=PADDED_VOCAB_SIZE, n_layer=2, n_head=4, n_embd=128)).to(device).eval()
    with torch.no_grad():  # as on the CPU: weights scaled up, so the picks depend on the logits, not on near-ties
        for p in model.parameters():
            p.mul_(8)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # full fp32 matmuls: TF32's rounding alone can flip a tie
    try:
        idx = torch.randint(0, 50257, (4, 40), device=device, generator=torch.Generator(device).manual_seed(1))
        with torch.no_grad():
            full = model(idx)[0]
            caches = [[] for _ in model.transformer.h]
            first = model(idx[:, :30], pos=torch.arange(0, 30, device=device), caches=caches)[0]
            steps = [model(idx[:, t:t + 1], pos=torch.arange(t, t + 1, device=device), caches=caches)[0]
                     for t in range(30, 40)]
        assert torch.allclose(torch.cat([first, *steps], dim=1), full, atol=1e-3, rtol=1e-4)
        start = torch.full((4, 1), 50256, device=device)
        a, b = (model.generate(start, 40, generator=torch.Generator(device).manual_seed(42), kv_cache=c) for c in (True, False))
        assert torch.equal(a, b) and len(set(a[:, 1:].flatten().tolist())) > 10  # equal by more than luck
    finally:
        torch.set_float32_matmul_precision(precision)


def test_the_async_host_and_compile_step_candidates_take_the_plain_steps_on_cuda():
    device = init_device("cuda")
    x = torch.arange(8).view(2, 4)
    (moved,) = bench.to_device((x,), device, pinned=True)
    assert moved.is_cuda and torch.equal(moved.cpu(), x)
    def losses(**setting):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=256, vocab_size=PADDED_VOCAB_SIZE, n_layer=4, n_head=4, n_embd=256)).to(device)
        return bench.time_training(model, 8, 256, device, steps=5, warmup=1, **setting)[1]  # compiled, bf16
    plain, host = losses(), losses(host="plain")
    assert all(abs(a - b) < 1e-4 for a, b in zip(losses(host="async"), host)), host  # only where the host waits
    assert all(abs(a - b) < 0.02 for a, b in zip(losses(compile_step=True), plain)), plain  # bf16 noise
