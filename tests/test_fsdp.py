"""FSDP2 on the CPU: torchrun with gloo, against one process, and checkpoints that move between them."""
import os

import pytest
import torch

from conftest import DDP, ROOT, assert_same_log, error_of, read_log, run, torchrun
import train_gpt2

# DDP's 5 steps, with checkpoints after steps 2 and 4
RUN = [*DDP, "--checkpoint_every", "3"]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """One process, 2 micro-batches a step: what 2 processes of 1 micro-batch each must log."""
    d = tmp_path_factory.mktemp("one")
    out = run(["train_gpt2.py", *RUN, "--log_dir", str(d)])
    assert out.returncode == 0, out.stderr
    return d


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    out = torchrun(2, [*RUN, "--fsdp", "1", "--log_dir", str(d)])
    assert out.returncode == 0, out.stderr
    return d, out.stdout


def test_fsdp_on_two_processes_logs_what_one_process_logs(one, fsdp):
    d, stdout = fsdp
    kinds = [kind for _, kind, _ in read_log(one)]
    assert kinds.count("train") == 5 and kinds.count("hella") == 3
    assert_same_log(d, one, tol=1e-5)
    assert "= 1 micro-batches of 2 x 16 on each of 2 processes" in stdout
    for line in ("step     4 |", "sample 3:", "saved "):  # every rank samples under FSDP; rank 0 alone prints
        assert stdout.count(line) == (2 if line == "saved " else 1), line
    assert sorted(os.listdir(d)) == ["curves.png", "log.txt", "model_00002.pt", "model_00004.pt"]


def test_fsdp_compiled_logs_what_one_process_logs(one, tmp_path):
    out = torchrun(2, [*RUN, "--fsdp", "1", "--compile", "1", "--log_dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    assert "compile:" not in out.stdout  # compiled, not the eager fallback
    assert_same_log(tmp_path, one, tol=1e-5)


def test_an_fsdp_checkpoint_is_one_whole_file_in_the_usual_format(one, fsdp):
    ours = torch.load(fsdp[0] / "model_00004.pt", weights_only=True)
    reference = torch.load(one / "model_00004.pt", weights_only=True)
    assert ours.keys() == reference.keys() and ours["model"].keys() == reference["model"].keys()
    for k, v in ours["model"].items():  # whole tensors, not shards
        assert type(v) is torch.Tensor and v.shape == reference["model"][k].shape, k
        assert torch.allclose(v, reference["model"][k], atol=1e-5), k
    assert ours["model"]["lm_head.weight"].data_ptr() == ours["model"]["transformer.wte.weight"].data_ptr()  # tied, saved once
    assert ours["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"]
    for i, state in reference["optimizer"]["state"].items():  # AdamW's moments: the same up to summation order
        for k in ("exp_avg", "exp_avg_sq"):
            assert (ours["optimizer"]["state"][i][k] - state[k]).abs().max() <= 1e-4 * state[k].abs().max(), (i, k)
    assert ours["train_loader"] == reference["train_loader"] == {"offset": 320} and ours["step"] == 5


def test_an_fsdp_checkpoint_resumes_in_one_process_and_a_ddp_one_under_fsdp(one, fsdp, tmp_path):
    out = run(["train_gpt2.py", *RUN, "--resume", str(fsdp[0] / "model_00002.pt"), "--log_dir", str(tmp_path / "a")])
    assert out.returncode == 0, out.stderr
    assert_same_log(tmp_path / "a", one, tol=1e-5, after=2)
    ddp = tmp_path / "ddp"
    out = torchrun(2, [*RUN, "--max_steps", "5", "--log_dir", str(ddp)])
    assert out.returncode == 0, out.stderr
    out = torchrun(2, [*RUN, "--fsdp", "1", "--resume", str(ddp / "model_00002.pt"), "--log_dir", str(tmp_path / "b")])
    assert out.returncode == 0, out.stderr
    assert_same_log(tmp_path / "b", one, tol=1e-5, after=2)


def test_sharded_checkpoints_hold_the_same_run_and_resume_exactly_under_fsdp_and_in_one_process(one, fsdp, tmp_path):
    d, args = tmp_path / "sharded", [*RUN, "--hellaswag", "0"]  # the losses are what matter here
    out = torchrun(2, [*args, "--fsdp", "1", "--sharded_checkpoints", "1", "--log_dir", str(d)])
    assert out.returncode == 0, out.stderr
    assert_same_log(d, fsdp[0], kinds=("train", "val"))  # the run with one file a checkpoint, digit for digit
    assert sorted(os.listdir(d)) == ["curves.png", "log.txt", "model_00002.dcp", "model_00004.dcp"]
    assert sorted(os.listdir(d / "model_00002.dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    # read whole, in one process (sample.py, export_hf.py): the very weights the one-file save holds
    whole, sharded = (train_gpt2.load_model(str(path)).state_dict() for path in
                      (fsdp[0] / "model_00004.pt", d / "model_00004.dcp"))
    assert whole.keys() == sharded.keys() and all(torch.equal(whole[k], sharded[k]) for k in whole)
    out = torchrun(2, [*args, "--fsdp", "1", "--resume", str(d / "model_00002.dcp"), "--log_dir", str(tmp_path / "a")])
    assert out.returncode == 0 and "resuming at step 3" in out.stdout, out.stderr
    out = run(["train_gpt2.py", *args, "--resume", str(d / "model_00002.dcp"), "--log_dir", str(tmp_path / "b")])
    assert out.returncode == 0 and "resuming at step 3" in out.stdout and out.stderr == "", out.stderr
    for resumed in ("a", "b"):
        assert_same_log(tmp_path / resumed, d, after=2)


def test_fsdp_without_torchrun_says_how_to_start_it(tmp_path):
    assert error_of(train_gpt2.main, [*RUN, "--fsdp", "1", "--log_dir", str(tmp_path)]) == (
        "error: --fsdp 1 shards the model across the processes torchrun starts: launch with torchrun "
        "(--nproc_per_node=N), or pass --fsdp 0")


def test_only_rank_0_builds_the_weights_and_fsdp_bf16_gathers_the_blocks_in_bf16_moving_the_losses_slightly(tmp_path):
    wrapper = tmp_path / "shards.py"  # where each rank built its model, what it holds, what block 0 computes with
    wrapper.write_text(f"""import sys
sys.path.insert(0, {ROOT!r})
import train_gpt2
real_shard = train_gpt2.shard_model
def shard_model(model, device, master, *args):
    built = {{p.device.type for p in model.parameters()}}
    real_shard(model, device, master, *args)
    local = sum(p.to_local().numel() for p in model.parameters())
    print(f"master {{master}} built on {{built}}, holds {{local}} of {{sum(p.numel() for p in model.parameters())}}",
          file=sys.stderr)
    hook = model.transformer.h[0].register_forward_pre_hook(
        lambda m, x: print("gathered", m.attn.c_attn.weight.dtype, file=sys.stderr))
    model.register_forward_hook(lambda *_: hook.remove())  # the first forward only
train_gpt2.shard_model = shard_model
train_gpt2.main(sys.argv[1:])
""")
    args = [*RUN, "--fsdp", "1", "--bf16", "1", "--hellaswag", "0", "--max_steps", "4"]
    n = 2 * (12 * 32 * 32 + 13 * 32) + 50304 * 32 + 16 * 32 + 2 * 32  # 2 blocks, wte (= lm_head), wpe, ln_f
    logs = {}
    for traffic in ("0", "1"):
        logs[traffic] = tmp_path / traffic
        out = torchrun(2, [*args, "--fsdp_bf16", traffic, "--log_dir", str(logs[traffic])], script=str(wrapper))
        assert out.returncode == 0, out.stderr
        dtype = "torch.bfloat16" if traffic == "1" else "torch.float32"
        # rank 0 alone builds the weights; the other builds shapes only; each then holds its half, no more
        assert out.stderr.splitlines() == [f"master True built on {{'cpu'}}, holds {n // 2} of {n}", f"gathered {dtype}",
                                           f"master False built on {{'meta'}}, holds {n // 2} of {n}", f"gathered {dtype}"]
    assert_same_log(logs["1"], logs["0"], tol=1e-3)  # close: autocast ran the matmuls in bf16 already
    assert read_log(logs["1"]) != read_log(logs["0"])  # but not the same: now everything in a block is bf16


def test_fsdp_bf16_without_bf16_autocast_is_one_line(tmp_path):
    assert error_of(train_gpt2.main, [*RUN, "--fsdp", "1", "--fsdp_bf16", "1", "--log_dir", str(tmp_path)]) == (
        "error: --fsdp_bf16 1 computes the blocks in bf16, and bf16 autocast is off: pass --bf16 1 too, "
        "or --fsdp_bf16 0")

