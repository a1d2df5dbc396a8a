import os
import re
import subprocess
import sys

import torch

from conftest import assert_same_log, error_of, HELLASWAG_20, INPUT, parse_args, read_log, ROOT, SMALL
import train_gpt2
from machinery import world
from machinery.world import bf16_fast, maybe_compile
from train_gpt2 import DataLoaderLite, get_lr, GPT, GPTConfig


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=2, n_head=4, n_embd=256))
    x, y = DataLoaderLite(2, 16, data_root=INPUT).next_batch()
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


def test_bf16_autocast_runs_matmuls_in_bf16_and_keeps_the_loss_close():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=4, n_embd=64))
    x, y = DataLoaderLite(4, 32, data_root=INPUT).next_batch()
    with torch.no_grad():
        _, loss32 = model(x, y)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            logits, loss16 = model(x, y)
    assert logits.dtype == torch.bfloat16
    assert loss16.dtype == torch.float32  # autocast computes cross-entropy in fp32
    assert model.lm_head.weight.dtype == torch.float32  # the weights are untouched
    assert abs(loss16.item() - loss32.item()) < 0.02


def test_compiled_model_computes_the_eager_loss_and_trains():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=4, n_embd=32))
    compiled = maybe_compile(model, True, "cpu")
    assert compiled is not model
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 512, (2, 4, 32), generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        with torch.no_grad():
            _, eager = model(x, y)
        optimizer.zero_grad()
        _, loss = compiled(x, y)
        assert abs(loss.item() - eager.item()) < 1e-4
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_compile_falls_back_to_eager_without_a_c_compiler(monkeypatch, capsys):
    monkeypatch.setattr(world.shutil, "which", lambda name: None)
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    assert maybe_compile(model, True, "cpu") is model
    assert "no C/C++ compiler found" in capsys.readouterr().out
    assert maybe_compile(model, False, "cpu") is model


def test_the_optimizer_steps_with_the_clipped_gradient(tmp_path, monkeypatch, capsys):
    seen = []  # the global gradient norm as each optimizer step sees it
    real_step = torch.optim.AdamW.step
    def step_and_watch(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.sqrt(sum((g ** 2).sum() for g in grads)).item())
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step_and_watch)
    train_gpt2.main([*SMALL, "--max_steps", "3", "--max_lr", "1e-3", "--device", "cpu", "--log_dir", str(tmp_path)])
    out = capsys.readouterr().out
    # wte, wpe (16 positions: the context is --seq_len) and 2 blocks of 4 matrices; 2 blocks of 2 LayerNorms (weight, bias) and 4 biases, and ln_f
    assert "decayed tensors: 10, with 1,634,816 parameters" in out and "non-decayed tensors: 18, with 896 parameters" in out
    printed = [float(n) for n in re.findall(r"\| norm ([0-9.]+) \|", out)]
    assert len(seen) == len(printed) == 3 and printed[0] > 1.0  # the printed norm is the one before clipping
    assert abs(seen[0] - 1.0) < 1e-4  # what the optimizer saw: scaled down to exactly 1
    assert all(n <= 1.0 + 1e-4 for n in seen)


def test_get_lr_warmup_cosine_and_floor():
    import math
    kw = dict(warmup_steps=715, max_steps=19073, max_lr=6e-4, min_lr=6e-5)
    cosine = lambda s: 6e-5 + 0.5 * (1 + math.cos(math.pi * (s - 715) / (19073 - 715))) * (6e-4 - 6e-5)
    expected = {0: 6e-4 * 1 / 715, 714: 6e-4, 715: 6e-4, 9894: cosine(9894), 19072: cosine(19072), 20000: 6e-5}
    for step, lr in expected.items():
        assert math.isclose(get_lr(step=step, **kw), lr, rel_tol=1e-12), step
    assert math.isclose(get_lr(step=9894, **kw), 3.3e-4, rel_tol=1e-12)  # halfway down: the midpoint
    assert min(get_lr(step=s, **kw) for s in range(715, 20001)) == 6e-5  # after warmup, never below the floor
    assert all(get_lr(step=s, **kw) > 0 for s in range(715))  # warmup never yields 0
    assert get_lr(step=0, warmup_steps=0, max_steps=10, max_lr=1.0, min_lr=0.1) == 1.0


def test_configure_optimizers_groups_for_gpt2_124M():
    with torch.device("meta"):  # shapes are all that matter here
        model = GPT(GPTConfig(vocab_size=50304))
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type="cpu")
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert len(decay["params"]) == 50 and sum(p.numel() for p in decay["params"]) == 124_354_560
    assert len(no_decay["params"]) == 98 and sum(p.numel() for p in no_decay["params"]) == 121_344
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8 and decay["lr"] == 6e-4
    assert not decay["fused"]  # fused AdamW is for CUDA only


def test_accumulated_gradient_of_micro_batches_equals_the_one_batch_gradient():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=32))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (2, 8, 16), generator=g)
    _, loss = model(x, y)  # one pass over B = 8
    loss.backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for micro in range(4):  # four passes of B = 2, each loss scaled by 1/4
        _, loss = model(x[2 * micro:2 * micro + 2], y[2 * micro:2 * micro + 2])
        (loss / 4).backward()
    for a, b in zip(full, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_compiled_run_with_hellaswag_and_sampling_in_the_loop(tmp_path, capsys):
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train_gpt2.main([*SMALL, "--n_layer", "1", "--max_steps", "4", "--eval_every", "1", "--val_steps", "2",
                     "--sample_every", "1", "--hellaswag", "1", "--hellaswag_file", HELLASWAG_20, "--compile", "1",
                     "--bf16", "0", "--device", "cpu", "--log_dir", str(tmp_path)])
    out = capsys.readouterr().out
    kinds = [line.split()[1] for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert (kinds.count("train"), kinds.count("val"), kinds.count("hella")) == (4, 4, 4)
    assert out.count("sample 3: First Citizen:\n") == 3  # steps 1, 2, 3; the prompt: input.txt's first line
    printed = re.findall(r"^HellaSwag accuracy: (0\.\d{4}) over 20 examples \(\d+\.\d s\)$", out, re.M)
    assert printed == [value for _, kind, value in read_log(tmp_path) if kind == "hella"] and len(printed) == 4
    # 4 HellaSwag passes of varied shapes and 3 rounds of 32-token sampling, yet only the
    # training and validation graphs were compiled: eval runs on the eager model
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


def test_a_compile_failure_at_the_first_step_is_one_line_that_says_compile_0(tmp_path):
    import pytest
    import torch._dynamo
    import torch._inductor.config
    torch._dynamo.reset()
    # torch's own patch, not monkeypatch: the config's undo must go through torch, or later compiles find it broken
    # (pytest 9's monkeypatch deletes cpp.cxx instead of restoring it: see the test below)
    with torch._inductor.config.patch({"fx_graph_cache": False,  # compile for real, not from a cache
                                       "cpp.cxx": (None, "/nonexistent/c++")}):  # as if no compiler worked
        with pytest.raises(SystemExit) as e:
            train_gpt2.main([*SMALL, "--n_layer", "1", "--n_embd", "24", "--seq_len", "8", "--total_batch_size", "16",
                             "--max_steps", "2", "--compile", "1", "--bf16", "0", "--device", "cpu", "--log_dir", str(tmp_path)])
    torch._dynamo.reset()
    message = str(e.value.code)
    assert message.startswith("error: torch.compile failed (") and "No working C++ compiler" in message
    assert message.endswith("): pass --compile 0 to train without it") and "\n" not in message
    assert os.listdir(tmp_path) == []  # nothing logged: it failed before the first step's val loss


def test_a_compile_after_the_compile_failure_test_in_the_same_process_still_compiles():
    # the failure test breaks torch's compiler config on purpose; whatever pytest's version, what runs after it in the
    # same process must find the config whole again, and compile
    here = "tests/test_training.py::"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           here + "test_a_compile_failure_at_the_first_step_is_one_line_that_says_compile_0",
                           here + "test_compile_mode_max_autotune_reaches_torch_compile_and_trains_what_eager_trains"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and re.search(r"^2 passed", done.stdout.splitlines()[-1]), done.stdout[-3000:]


def test_bf16_defaults_to_auto_which_is_off_on_the_cpu(tmp_path):
    assert parse_args([]).bf16 == "auto"
    assert (parse_args(["--bf16", "1"]).bf16, parse_args(["--bf16", "0"]).bf16) == (True, False)
    assert bf16_fast("cpu") is False and bf16_fast("mps") is False
    train_gpt2.main([*SMALL, "--n_layer", "1", "--n_embd", "16", "--seq_len", "8", "--total_batch_size", "16",
                     "--max_steps", "1", "--device", "cpu", "--log_dir", str(tmp_path)])  # no --bf16: auto
    saved = torch.load(tmp_path / "model_00000.pt", weights_only=True)["config"]
    assert saved["bf16"] is False  # the checkpoint records what auto meant here, so a resume compares like with like


def test_activation_checkpointing_runs_each_block_again_in_backward_and_changes_no_loss(tmp_path, monkeypatch):
    calls = []
    real_forward = train_gpt2.Block.forward
    def counted(self, *args):
        calls.append(1)
        return real_forward(self, *args)
    monkeypatch.setattr(train_gpt2.Block, "forward", counted)
    runs = {}
    for flag in ("0", "1"):
        calls.clear()
        train_gpt2.main([*SMALL, "--max_steps", "3", "--eval_every", "2", "--val_steps", "2",
                         "--activation_checkpointing", flag, "--log_dir", str(tmp_path / flag)])
        runs[flag] = len(calls)
    assert runs["1"] - runs["0"] == 2 * 3  # 2 blocks run again in each of 3 backward passes
    assert len(read_log(tmp_path / "0")) == 5  # 3 train, 2 val
    assert_same_log(tmp_path / "1", tmp_path / "0", tol=1e-6)


def test_compile_mode_max_autotune_reaches_torch_compile_and_trains_what_eager_trains(tmp_path, monkeypatch):
    modes = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: modes.append(kw.get("mode")) or real_compile(model, **kw))
    args = [*SMALL, "--max_steps", "2", "--eval_every", "1", "--val_steps", "1", "--bf16", "0", "--device", "cpu"]
    train_gpt2.main([*args, "--compile", "1", "--compile_mode", "max-autotune-no-cudagraphs", "--log_dir", str(tmp_path / "c")])
    train_gpt2.main([*args, "--log_dir", str(tmp_path / "eager")])  # SMALL: --compile 0
    assert modes == ["max-autotune-no-cudagraphs"]  # the candidate is what was compiled
    assert_same_log(tmp_path / "c", tmp_path / "eager", tol=2e-6)  # the same math: fp32 within rounding
    assert error_of(train_gpt2.main, [*args, "--compile_mode", "fast"]) == \
        "error: --compile_mode 'fast' is not one of default, max-autotune-no-cudagraphs"
