"""DistributedDataParallel on the CPU: torchrun with the gloo backend."""
import os
import re
import subprocess
import sys

from test_cli import read_log, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny model, 2 sequences of 16 tokens per micro-batch, 64 tokens per optimisation step
HELLA = os.path.join(ROOT, "tests", "fixtures", "hellaswag_val_20.jsonl")
TINY = ["--data", "input.txt", "--hellaswag_file", HELLA, "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "2", "--seq_len", "16",
        "--total_batch_size", "64", "--max_steps", "5", "--warmup_steps", "2", "--max_lr", "1e-3",
        "--compile", "0", "--bf16", "0", "--device", "cpu", "--eval_every", "2", "--val_steps", "3"]


def torchrun(nproc, args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train_gpt2.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_two_processes_match_one_process_with_twice_the_accumulation(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    out1 = run(["train_gpt2.py", *TINY, "--log_dir", str(one)])  # 2 micro-batches, 1 process
    assert out1.returncode == 0, out1.stderr
    assert "= 2 micro-batches of 2 x 16 on each of 1 processes" in out1.stdout
    out2 = torchrun(2, [*TINY, "--log_dir", str(two)])  # 1 micro-batch on each of 2 processes
    assert out2.returncode == 0, out2.stderr
    assert "= 1 micro-batches of 2 x 16 on each of 2 processes" in out2.stdout
    log1, log2 = read_log(one), read_log(two)
    assert [(s, k) for s, k, _ in log1] == [(s, k) for s, k, _ in log2]
    losses1 = [float(l) for _, k, l in log1 if k == "train"]
    losses2 = [float(l) for _, k, l in log2 if k == "train"]
    assert len(losses1) == len(losses2) == 5
    for a, b in zip(losses1, losses2):
        assert abs(a - b) < 1e-5, (losses1, losses2)
    assert losses1[-1] < losses1[0]
    # val at steps 0, 2 and 4 (the last); 3 val batches: rank 0 takes two, rank 1 one
    val1 = [(s, float(l)) for s, k, l in log1 if k == "val"]
    val2 = [(s, float(l)) for s, k, l in log2 if k == "val"]
    assert [s for s, _ in val1] == ["0", "2", "4"]
    for (_, a), (_, b) in zip(val1, val2):
        assert abs(a - b) < 1e-5, (val1, val2)
    # HellaSwag: 20 examples, 10 on each rank, counts summed: the same accuracy as one process
    hella1 = [(s, l) for s, k, l in log1 if k == "hella"]
    assert [s for s, _ in hella1] == ["0", "2", "4"]
    assert hella1 == [(s, l) for s, k, l in log2 if k == "hella"]
    assert all(float(l) * 20 == round(float(l) * 20) for _, l in hella1)  # a count out of 20
    assert sorted(os.listdir(two)) == ["log.txt", "model_00004.pt"]  # rank 0 alone writes: one log, one checkpoint
    assert len(re.findall(r"^step +0 \|", out2.stdout, re.M)) == 1  # rank 0 alone prints
    assert "destroy_process_group" not in out2.stderr  # the process group was torn down cleanly
