"""--batch_size auto: the largest micro-batch that fits, tried (here with an injected out-of-memory) or estimated."""
import os

import torch

from conftest import assert_same_log, parse_args, SMALL
import train_gpt2
from machinery import memory
from machinery.memory import choose_batch_size, estimated_bytes
from machinery.world import World
from train_gpt2 import GPT, GPTConfig

# 2 blocks of 32 channels, 4,096 tokens a step of 64-token sequences: 64 sequences, so B may be 64, 32, ..., 1
AUTO = [*SMALL, "--batch_size", "auto", "--seq_len", "64", "--total_batch_size", "4096", "--max_steps", "2",
        "--eval_every", "1", "--val_steps", "2", "--sample_every", "1000", "--bf16", "0", "--device", "cpu"]


def out_of_memory_above(model, most):
    """Make model's forward run out of memory, as a GPU would, for batches of more than most rows; returns the
    batch sizes it was called with."""
    calls = []
    def hook(module, args):
        calls.append(args[0].size(0))
        if args[0].size(0) > most:
            torch.empty(1)  # something allocated before the failure, to be freed after it
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    model.register_forward_pre_hook(hook)
    return calls


def test_auto_tries_the_largest_first_and_takes_the_first_that_runs_freeing_memory_between_tries(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = out_of_memory_above(model, 8)
    freed = []
    monkeypatch.setattr(memory, "free_memory", lambda m: freed.append(len(calls)) or m.zero_grad(set_to_none=True))
    world = World(device="cpu")
    world.device_type = "cuda"  # the path a CUDA GPU takes, trying each size, on this CPU
    cfg = parse_args(AUTO[:-4] + ["--compile", "0"])
    cfg.bf16 = False
    lines = []
    assert choose_batch_size(cfg, world, model, log=lines.append) == 8
    assert calls == [64, 32, 16, 8]  # largest first, down to the first that runs
    assert freed == [1, 2, 3, 4]  # after every try, the failed ones included
    assert lines == ["--batch_size auto: 8 (the largest that ran a step here with 10% of the memory to spare)"]
    assert all(p.grad is None for p in model.parameters())  # the try's gradients are not left for the run
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nor any change to the weights


def test_auto_tries_the_model_as_the_run_trains_it_with_a_tenth_of_the_memory_set_aside(tmp_path, monkeypatch):
    seen = []
    real_choose = train_gpt2.choose_batch_size
    def choose(cfg, world, model, log):  # the model main() hands to --batch_size auto, as it is then
        seen.append((model.loss_chunks, model.activation_checkpointing))
        return real_choose(cfg, world, model, log)
    monkeypatch.setattr(train_gpt2, "choose_batch_size", choose)
    train_gpt2.main([*AUTO, "--max_steps", "1", "--loss_chunks", "4", "--activation_checkpointing", "1",
                     "--log_dir", str(tmp_path)])
    assert seen == [(4, True)]  # not the plain model: the chunked loss and checkpointing change what fits
    # on a GPU each size is tried with AdamW's moments and a tenth of the memory taken first: a size that only just
    # ran once is not chosen
    reserved = []
    monkeypatch.setattr(memory, "trial_step", lambda model, B, T, device, bf16, aside: reserved.append(aside))
    monkeypatch.setattr(memory, "device_memory", lambda device: 2**30)
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32))
    world = World(device="cpu")
    world.device_type = "cuda"  # the path a CUDA GPU takes, on this CPU
    cfg = parse_args([*AUTO[:-4], "--compile", "0"])
    assert choose_batch_size(cfg, world, model, log=lambda line: None) == 64 and len(reserved) == 1
    assert reserved[0] == 8 * sum(p.numel() for p in model.parameters()) + int(0.1 * 2**30)


def test_auto_says_in_one_line_when_not_even_one_sequence_fits(monkeypatch):
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32))
    out_of_memory_above(model, 0)
    world = World(device="cpu")
    world.device_type = "cuda"
    cfg = parse_args(AUTO)
    cfg.bf16 = False
    try:
        choose_batch_size(cfg, world, model, log=print)
    except ValueError as e:
        assert str(e) == ("--batch_size auto: even one sequence does not fit: pass a smaller --seq_len, or "
                          "--activation_checkpointing 1, or --fsdp 1 under torchrun")
    else:
        raise AssertionError("no error")


def test_auto_on_the_cpu_picks_from_the_estimate_and_trains_what_that_batch_size_trains(tmp_path, monkeypatch, capsys):
    cfg = parse_args(AUTO)
    cfg.bf16 = False
    config = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    n_params = sum(p.numel() for p in GPT(config).parameters())
    # a machine whose memory holds the estimate of B=16 at 90%, not B=32's
    ram = estimated_bytes(cfg, config, n_params, 1, 16) / 0.9 + 1
    assert estimated_bytes(cfg, config, n_params, 1, 32) > 0.9 * ram
    monkeypatch.setattr(memory, "device_memory", lambda device: ram)
    train_gpt2.main([*AUTO, "--log_dir", str(tmp_path / "auto")])
    out = capsys.readouterr().out
    assert (f"--batch_size auto: 16 (the largest the memory estimate fits in 90% of this device's {ram / 2**30:.1f} GiB)\n"
            in out) and "total batch 4,096 tokens = 4 micro-batches of 16 x 64 on each of 1 processes\n" in out
    train_gpt2.main([*AUTO[:-4], "--batch_size", "16", "--device", "cpu", "--log_dir", str(tmp_path / "16")])
    assert_same_log(tmp_path / "auto", tmp_path / "16")  # digit for digit: the run is the B=16 run


def test_the_dry_run_plans_auto_for_an_80_gib_gpu_and_names_the_others(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train_gpt2.main(["--batch_size", "auto", "--dry_run", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert ("--batch_size auto: 64 for 80 GiB, from the memory estimate (32 on 40 GiB, 64 on 80 GiB, 128 on 141 GiB; "
            "a run on a CUDA GPU tries them)\ntotal batch 524,288 tokens = 8 micro-batches of 64 x 1024") in out
    train_gpt2.main(["--model", "gpt3-13b", "--batch_size", "auto", "--dry_run", "1", "--device", "cpu"])
    assert "--batch_size auto: not even 1 fits; planned at 1 for 80 GiB" in capsys.readouterr().out


def test_on_the_cpu_auto_plans_for_the_memory_the_process_may_use_not_the_machines(tmp_path, monkeypatch):
    import resource
    ram = memory.device_memory("cpu")
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (str(tmp_path / "none"),))  # no container limit here
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert memory.device_memory("cpu") == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >= ram
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (3 * 2**30, resource.RLIM_INFINITY))  # ulimit -v
    assert memory.device_memory("cpu") == 3 * 2**30
    (tmp_path / "memory.max").write_text("1073741824\n")  # a container of 1 GiB (cgroup v2)
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (str(tmp_path / "memory.max"),))
    assert memory.device_memory("cpu") == 2**30
    (tmp_path / "memory.max").write_text("max\n")  # no limit
    assert memory.device_memory("cpu") == 3 * 2**30
