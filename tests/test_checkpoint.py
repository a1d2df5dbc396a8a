"""Checkpoints, exact resume, pre-emption and a run that blows up."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from fractions import Fraction

import pytest
import torch

from conftest import HELLASWAG_20, INPUT, ROOT, TINY, assert_same_log, error_of, run, torchrun
import eval_hellaswag
import export_hf
import sample
import train_gpt2
from machinery.checkpoints import checkpoint_meta, restore_checkpoint, whole_state, write_checkpoint_file
from machinery.settings import TrainConfig
from train_gpt2 import DataLoaderLite, GPT, GPTConfig, load_model


def log_text(d):
    return (d / "log.txt").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 6-step run checkpointed after steps 2 and 5: what resumed runs must reproduce."""
    a = tmp_path_factory.mktemp("uninterrupted")
    out = run(["train_gpt2.py", *TINY, "--max_steps", "6", "--checkpoint_every", "3", "--log_dir", str(a)])
    assert out.returncode == 0, out.stderr
    return a


def test_a_resumed_run_logs_exactly_what_an_uninterrupted_run_logs(tmp_path, uninterrupted):
    a, b = uninterrupted, tmp_path / "b"
    assert sorted(os.listdir(a)) == ["curves.png", "log.txt", "model_00002.pt", "model_00005.pt"]
    # b: the same run stopped after step 2; its log so far, then a resume from step 2's checkpoint
    b.mkdir()
    before = [l for l in log_text(a).splitlines(keepends=True) if int(l.split()[0]) <= 2]
    (b / "log.txt").write_text("".join(before))
    out = run(["train_gpt2.py", *TINY, "--max_steps", "6", "--checkpoint_every", "3", "--log_dir", str(b),
               "--resume", str(a / "model_00002.pt")])
    assert out.returncode == 0, out.stderr
    assert "resuming at step 3" in out.stdout
    assert_same_log(b, a)  # bit for bit: train and val losses, same lines
    ca = torch.load(a / "model_00005.pt", weights_only=True)
    cb = torch.load(b / "model_00005.pt", weights_only=True)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert ca["step"] == cb["step"] == 6 and ca["train_loader"] == cb["train_loader"] == {"offset": 6 * 64 % 304222}
    assert ca["config"]["n_embd"] == 16 and ca["model_config"]["vocab_size"] == 50304


def test_resume_with_other_settings_or_a_fresh_run_over_a_log_is_refused(tmp_path):
    out = run(["train_gpt2.py", *TINY, "--max_steps", "2", "--log_dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    log = log_text(tmp_path)
    error = error_of(train_gpt2.main, [*TINY, "--n_embd", "32", "--max_steps", "2", "--resume", "auto",
                                       "--log_dir", str(tmp_path)])
    assert "was made with --n_embd 16, not 32: resume with the run's own settings" in error
    error = error_of(train_gpt2.main, [*TINY, "--max_steps", "2", "--log_dir", str(tmp_path)])
    assert "log.txt exists: continue that run with --resume auto, or start this one in another --log_dir" in error
    assert log_text(tmp_path) == log  # never truncated
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "log.txt", "model_00001.pt"]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = run(["train_gpt2.py", *TINY, "--max_steps", "20", "--max_lr", "1e30", "--warmup_steps", "0",
               "--checkpoint_every", "1", "--log_dir", str(tmp_path)])
    assert out.returncode != 0
    step = re.search(rf"^error: the loss is (nan|inf) at step (\d+): stopping before the weights are updated; the checkpoints already in "
                     rf"{re.escape(str(tmp_path))} are untouched \(try a lower --max_lr\)$", out.stderr, re.M)
    assert step and out.stderr.count("\n") == 1, out.stderr
    saved = sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt"))
    assert saved and saved[-1] == f"model_{int(step.group(2)) - 1:05d}.pt"  # each step before the blow-up, not it
    last = torch.load(tmp_path / saved[-1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def tiny_checkpoint(path):
    """A real checkpoint of a tiny model after one training step, as the trainer writes it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu")
    loader = DataLoaderLite(2, 16, data_root=INPUT)
    model(*loader.next_batch())[1].backward()
    optimizer.step()
    state = whole_state(model, optimizer, keep=True)
    write_checkpoint_file(str(path), state, checkpoint_meta(1, model.config, loader, TrainConfig(n_layer=1, n_head=2, n_embd=16, seq_len=16)))
    return path


def bad_checkpoints(d):
    """Files a user may point any entry point at, each with what the one-line error must say."""
    good = tiny_checkpoint(d / "good.pt").read_bytes()
    (d / "empty.pt").write_bytes(b"")
    (d / "truncated.pt").write_bytes(good[:len(good) // 2])
    (d / "text.pt").write_text("not a checkpoint\n")
    torch.save({"model": {"w": torch.zeros(2)}, "model_config": {"n_layer": 1}, "note": Fraction(1, 3)}, d / "code.pt")
    torch.save({"weights": torch.zeros(2)}, d / "nokeys.pt")
    other = torch.load(d / "good.pt", weights_only=True)
    other["model"]["transformer.wpe.weight"] = torch.zeros(8, 16)  # another context length than model_config says
    torch.save(other, d / "shape.pt")
    return {
        "missing.pt": "checkpoint '{d}/missing.pt' not found",
        "empty.pt": "checkpoint {d}/empty.pt is empty (0 bytes)",
        "truncated.pt": "cannot read checkpoint {d}/truncated.pt: it is truncated, or not a checkpoint of this",
        "text.pt": "cannot read checkpoint {d}/text.pt: it is truncated, or not a checkpoint of this project",
        "code.pt": "cannot read checkpoint {d}/code.pt: it is truncated, or not a checkpoint of this project",
        "nokeys.pt": "{d}/nokeys.pt is not a checkpoint of this project: it has no model, model_config",
        "shape.pt": "transformer.wpe.weight has shape (8, 16), the model's is (16, 16)",
    }


def test_one_reader_turns_every_bad_checkpoint_into_a_clear_error(tmp_path):
    for name, message in bad_checkpoints(tmp_path).items():
        with pytest.raises(ValueError) as e:
            load_model(str(tmp_path / name))
        assert message.format(d=tmp_path) in str(e.value), name
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value), name
    assert load_model(str(tmp_path / "good.pt")).config.n_embd == 16


def test_every_entry_point_that_reads_a_checkpoint_refuses_a_bad_one_in_one_line(tmp_path):
    messages = bad_checkpoints(tmp_path)
    log = tmp_path / "log"
    cases = [
        (train_gpt2.main, [*TINY, "--log_dir", str(log), "--resume", str(tmp_path / "truncated.pt")], "truncated.pt"),
        (train_gpt2.main, [*TINY, "--log_dir", str(log), "--init_from", str(tmp_path / "code.pt")], "code.pt"),
        (sample.main, ["-m", str(tmp_path / "empty.pt"), "-d", "cpu"], "empty.pt"),
        (export_hf.main, [str(tmp_path / "shape.pt"), str(tmp_path / "hf")], "shape.pt"),
        (eval_hellaswag.main, ["-m", str(tmp_path / "text.pt"), "-d", "cpu", "--data_file", HELLASWAG_20], "text.pt"),
    ]
    for main, args, name in cases:
        error = error_of(main, args)
        assert error.startswith("error: ") and messages[name].format(d=tmp_path) in error and "\n" not in error, error
    assert not log.exists() and not (tmp_path / "hf").exists()


class Planted:
    """What a stranger's .metadata could hold: unpickled, it runs os.mkdir (any call would do)."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_planted_sharded_checkpoint_is_refused_on_every_path_without_running_its_payload(tmp_path):
    import pickle
    marker = tmp_path / "the_payload_ran"
    log = tmp_path / "log"
    log.mkdir()
    planted = log / "model_99999.dcp"  # as if put into a shared --log_dir: the newest checkpoint there
    planted.mkdir()
    (planted / ".metadata").write_bytes(pickle.dumps(Planted(str(marker))))
    refused = (f"error: checkpoint {planted} is refused: its .metadata names posix.mkdir, which checkpoint metadata "
               "never holds (unpickled, it could run code)")
    for main, args in [
        (train_gpt2.main, [*TINY, "--log_dir", str(tmp_path / "a"), "--resume", str(planted)]),
        (train_gpt2.main, [*TINY, "--log_dir", str(tmp_path / "b"), "--init_from", str(planted)]),
        (sample.main, ["-m", str(planted), "-d", "cpu"]),
        (export_hf.main, [str(planted), str(tmp_path / "hf")]),
        (eval_hellaswag.main, ["-m", str(planted), "-d", "cpu", "--data_file", HELLASWAG_20]),
    ]:
        assert error_of(main, args) == refused, args
    (log / "log.txt").write_text("0 train 10.000000\n")
    error = error_of(train_gpt2.main, [*TINY, "--log_dir", str(log), "--resume", "auto"])  # skipped, and none is left
    assert error == (f"error: --resume auto: none of the 1 checkpoints in {log} can be used (see above): pass "
                     "--resume with one you trust, or move the damaged ones away")
    assert not marker.exists()  # nothing ran
    assert sorted(os.listdir(tmp_path)) == ["log"] and sorted(os.listdir(log)) == ["log.txt", "model_99999.dcp"]


def test_resume_auto_skips_damaged_newer_checkpoints_for_the_newest_whole_one_and_a_finished_run_exits_0(tmp_path,
                                                                                                         capsys):
    import warnings
    import torch.distributed.checkpoint as dcp
    args = [*TINY, "--max_steps", "4", "--checkpoint_every", "1", "--log_dir", str(tmp_path)]
    train_gpt2.main(args)  # model_00000.pt ... model_00003.pt, the last the end of the run
    whole = torch.load(tmp_path / "model_00001.pt", weights_only=True)
    newest = tmp_path / "model_00003.pt"
    newest.write_bytes(newest.read_bytes()[:4096])  # cut short, as a crash of the machine can leave it
    (tmp_path / "model_00002.pt").write_bytes(b"")  # empty
    sharded = tmp_path / "model_00009.dcp"  # a sharded one, newer still, one of whose shards never arrived
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": whole["model"]}, checkpoint_id=str(sharded), no_dist=True)
    torch.save({k: v for k, v in whole.items() if k not in ("model", "optimizer")}, sharded / "meta.pt")
    shards = sorted(p.name for p in sharded.glob("*.distcp"))
    (sharded / shards[0]).unlink()
    capsys.readouterr()
    train_gpt2.main([*args, "--resume", "auto"])
    out = capsys.readouterr().out
    assert out.index(f"--resume auto: skipping {sharded}: its shard {shards[0]} is missing\n") < \
        out.index(f"--resume auto: skipping {newest}: cannot read checkpoint") < \
        out.index(f"--resume auto: skipping {tmp_path / 'model_00002.pt'}: is empty (0 bytes)") < \
        out.index(f"resuming from {tmp_path / 'model_00001.pt'}\n")
    assert "resuming at step 2" in out and [l.split()[:2] for l in (tmp_path / "log.txt").read_text().splitlines()
                                            if l.split()[1] == "train"] == [["0", "train"], ["1", "train"],
                                                                             ["2", "train"], ["3", "train"]]
    # named itself, a sharded checkpoint missing a shard is refused before log.txt is touched, and one without its
    # index gets advice that fits a sharded save
    log_text, kept = (tmp_path / "log.txt").read_text(), sorted(tmp_path.glob("log.txt.*"))  # .1: the resume above
    assert error_of(train_gpt2.main, [*args, "--resume", str(sharded)]) == \
        f"error: checkpoint {sharded} cannot be resumed: its shard {shards[0]} is missing; use another checkpoint"
    (sharded / ".metadata").unlink()
    assert error_of(sample.main, ["-m", str(sharded), "-d", "cpu"]) == (
        f"error: checkpoint {sharded} has no .metadata, the index of its shards: a sharded save that did not finish, "
        "or was copied in part; use another checkpoint")
    assert (tmp_path / "log.txt").read_text() == log_text and sorted(tmp_path.glob("log.txt.*")) == kept
    # a requeue after the end: nothing to do, said, and exit 0; naming the file itself stays an error
    with pytest.raises(SystemExit) as e:
        train_gpt2.main([*args, "--resume", "auto"])
    assert e.value.code == 0 and capsys.readouterr().out.endswith(
        f"--resume auto: {tmp_path / 'model_00003.pt'} ends the run (step 4 of 4): nothing is left to train\n")
    assert "ends its run (step 4 of 4): nothing is left to train" in error_of(
        train_gpt2.main, [*args, "--resume", str(tmp_path / "model_00003.pt")])


def test_resume_needs_a_whole_training_checkpoint(tmp_path):
    good = torch.load(tiny_checkpoint(tmp_path / "good.pt"), weights_only=True)
    torch.save({"model": good["model"], "model_config": good["model_config"]}, tmp_path / "weights.pt")
    error = error_of(train_gpt2.main, [*TINY, "--n_layer", "1", "--n_embd", "16", "--log_dir", str(tmp_path / "log"),
                                       "--resume", str(tmp_path / "weights.pt")])
    assert "weights.pt is not a checkpoint of this project: it has no optimizer, step, train_loader" in error


def test_resume_auto_before_the_first_checkpoint_starts_over_and_keeps_the_old_log(tmp_path):
    (tmp_path / "log.txt").write_text("0 val 10.9000\n0 train 10.900000\n1 train 10.800000\n")  # killed at step 1
    out = run(["train_gpt2.py", *TINY, "--max_steps", "2", "--resume", "auto", "--log_dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    assert f"--resume auto: no checkpoint in {tmp_path} yet: starting from step 0" in out.stdout
    assert "3 lines of step 0 on set aside" in out.stdout and "kept whole as" in out.stdout
    assert (tmp_path / "log.txt.1").read_text() == "0 val 10.9000\n0 train 10.900000\n1 train 10.800000\n"
    assert [l.split()[:2] for l in log_text(tmp_path).splitlines()] == [["0", "val"], ["0", "train"], ["1", "val"], ["1", "train"]]


def test_a_resume_after_a_kill_between_log_and_checkpoint_logs_each_step_once(tmp_path, uninterrupted):
    a, b = uninterrupted, tmp_path / "b"
    args = ["train_gpt2.py", *TINY, "--max_steps", "6", "--checkpoint_every", "3"]
    b.mkdir()
    (b / "log.txt").write_text(log_text(a))  # killed after logging step 5, before its checkpoint
    (b / "model_00002.pt").write_bytes((a / "model_00002.pt").read_bytes())
    out = run(args + ["--log_dir", str(b), "--resume", "auto"])
    assert out.returncode == 0, out.stderr
    assert_same_log(b, a)  # steps 3-5 once each, not twice
    assert (b / "log.txt.1").read_text() == log_text(a)


def test_a_full_disk_while_checkpointing_leaves_no_partial_file_and_names_the_last_good_one(tmp_path, monkeypatch):
    (tmp_path / "model_00007.pt.tmp").write_bytes(b"x" * 100)  # half-written by a run that died writing it
    real_save, saves = torch.save, []
    def save_until_the_disk_fills(obj, f):
        saves.append(f)
        if len(saves) == 1:
            return real_save(obj, f)
        with open(f, "wb") as out:
            out.write(b"x" * 1000)  # part of it made it to disk
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train_gpt2.torch, "save", save_until_the_disk_fills)
    with pytest.raises(SystemExit) as e:
        train_gpt2.main([*TINY, "--max_steps", "6", "--checkpoint_every", "2", "--log_dir", str(tmp_path)])
    assert e.value.code == (f"error: cannot write checkpoint {tmp_path}/model_00003.pt ([Errno 28] No space left on "
                            f"device): free some space; the last good checkpoint is {tmp_path}/model_00001.pt")
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "log.txt", "model_00001.pt"]  # no .tmp: neither the old nor the new
    assert torch.load(tmp_path / "model_00001.pt", weights_only=True)["step"] == 2


def start_and_signal_during_hellaswag(tmp_path, signals, *more):
    """A run with a long first HellaSwag pass, sent signals as it starts scoring, each one once the trainer has
    answered the one before: Python runs a handler once for signals that arrive during one long C call (a matmul)."""
    hella = tmp_path / "hella.jsonl"
    with open(HELLASWAG_20) as f:
        hella.write_text(f.read() * 100)  # 2,000 examples
    log = tmp_path / "log"
    args = [*TINY, "--n_layer", "2", "--n_embd", "64", "--hellaswag", "1", "--hellaswag_file", str(hella),
            "--max_steps", "5", "--log_dir", str(log), *more]
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "train_gpt2.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    def read_stdout():
        for line in proc.stdout:
            lines.append(line)
    reader = threading.Thread(target=read_stdout)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and not ((log / "log.txt").exists() and "0 val" in log_text(log)):
        time.sleep(0.02)  # the val loss is logged: HellaSwag comes next
    time.sleep(0.3)
    for i, sig in enumerate(signals):
        while i and time.time() < deadline and not any("stopping after this step" in line for line in lines):
            time.sleep(0.01)
        proc.send_signal(sig)
    proc.wait(timeout=120)
    reader.join()
    return proc.returncode, "".join(lines), (tmp_path / "stderr").read_text(), log


def test_a_stop_during_hellaswag_does_not_wait_for_the_whole_pass(tmp_path):
    code, stdout, stderr, log = start_and_signal_during_hellaswag(tmp_path, [signal.SIGTERM])
    assert code == 75, stderr
    assert "HellaSwag: cut short, a stop was requested" in stdout and "hella" not in log_text(log)
    # step 0 is not trained: there is nothing new to checkpoint, and a resume starts with step 0's evaluation
    assert "stopped before step 0" in stdout and sorted(os.listdir(log)) == ["STOPPED", "log.txt"]
    assert (log / "STOPPED").read_text() == ("stopped before step 0 (SIGTERM); no new checkpoint: "
                                             f"continue with --resume auto --log_dir {log}\n")


def test_one_call_restores_weights_optimizer_data_position_and_random_state(tmp_path, monkeypatch):
    checkpoint = torch.load(tiny_checkpoint(tmp_path / "c.pt"), weights_only=True)
    weights, moments = dict(checkpoint["model"]), checkpoint["optimizer"]["state"][0]["exp_avg"]
    rng = checkpoint["rng"]["cpu"]
    assert list(checkpoint["rng"]) == ["cpu"] and checkpoint["train_loader"] == {"offset": 32}
    for group in checkpoint["optimizer"]["param_groups"]:
        group["fused"] = True  # as if saved where CUDA's fused kernel ran
    checkpoint["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8  # saved where 8 GPUs were visible
    def one_gpu_here(states):
        raise RuntimeError(f"{len(states)} CUDA generator states for 1 GPU")
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", one_gpu_here)
    torch.manual_seed(1)  # other weights, another random state
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu")
    loader = DataLoaderLite(2, 16, data_root=INPUT)
    assert restore_checkpoint(checkpoint, model, optimizer, loader) == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert loader.offset == 32 and torch.equal(torch.get_rng_state(), rng)
    assert [g["fused"] for g in optimizer.param_groups] == [False, False]  # the CPU's choice, not the file's
    assert checkpoint == {}  # consumed: nothing keeps the 1.5 GB dict alive
    optimizer = model.configure_optimizers(0.1, 1e-3, "cuda")  # a CPU checkpoint resumed on CUDA: fused comes back
    restore_checkpoint(torch.load(tmp_path / "c.pt", weights_only=True), model, optimizer, loader)
    assert [g["fused"] for g in optimizer.param_groups] == [True, True]


def test_after_a_restore_with_fused_adamw_each_state_tensor_is_where_its_parameter_is(tmp_path):
    checkpoint = torch.load(tiny_checkpoint(tmp_path / "c.pt"), weights_only=True)  # saved on the CPU: not fused
    assert [g["fused"] for g in checkpoint["optimizer"]["param_groups"]] == [False, False]
    with torch.device("meta"):  # a device that is not the checkpoint's, as a GPU is not
        model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu")
    for group in optimizer.param_groups:
        group["fused"] = True  # what configure_optimizers chooses on CUDA
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # the random state the restore sets: this
        warnings.simplefilter("ignore", UserWarning)  # test's own; weights copied to meta tensors: a no-op, as meant
        restore_checkpoint(checkpoint, model, optimizer, DataLoaderLite(2, 16, data_root=INPUT))
    assert [g["fused"] for g in optimizer.param_groups] == [True, True]
    for p in model.parameters():
        state = optimizer.state[p]
        assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
        # the step counters too: the fused kernel refuses a step on the CPU beside moments on the GPU
        assert {k: t.device.type for k, t in state.items()} == dict.fromkeys(state, "meta")
        assert state["step"].dtype == torch.float32


def test_no_logits_or_checkpoint_weights_outlive_their_use(tmp_path, monkeypatch):
    import weakref
    args = [*TINY, "--max_steps", "4", "--checkpoint_every", "2"]
    train_gpt2.main([*args, "--log_dir", str(tmp_path / "a")])
    loaded, logits, alive = [], [], []
    real_load, real_forward = torch.load, train_gpt2.GPT.forward
    def load_and_watch(*a, **kw):
        checkpoint = real_load(*a, **kw)
        loaded.extend(weakref.ref(t) for t in checkpoint["model"].values())
        return checkpoint
    def forward_and_watch(self, idx, targets=None, **kw):  # kw: sampling's positions and KV caches
        if targets is not None:  # training and validation: what is still alive as a new forward starts
            alive.append((sum(r() is not None for r in loaded), sum(r() is not None for r in logits)))
        out = real_forward(self, idx, targets, **kw)
        logits.append(weakref.ref(out[0]))
        return out
    monkeypatch.setattr(train_gpt2.torch, "load", load_and_watch)
    monkeypatch.setattr(train_gpt2.GPT, "forward", forward_and_watch)
    train_gpt2.main([*args, "--log_dir", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "model_00001.pt")])
    assert len(loaded) == 17 and len(alive) == 2 * 2 + 2 * 2  # steps 2 and 3: 2 micro-steps and 2 val batches each
    assert alive == [(0, 0)] * len(alive)  # the checkpoint's weights freed, no earlier logits kept


def test_a_resume_with_another_micro_batch_on_another_number_of_processes_continues_the_same_steps(tmp_path):
    # B and the number of processes change how a step's 64 tokens go through the model, not which tokens
    args = [*TINY, "--max_steps", "6", "--checkpoint_every", "3", "--eval_every", "1000"]
    whole = run(["train_gpt2.py", *args, "--batch_size", "4", "--log_dir", str(tmp_path / "whole")])
    assert whole.returncode == 0 and "1 micro-batches of 4 x 16 on each of 1 processes" in whole.stdout, whole.stderr
    resume = ["--resume", str(tmp_path / "whole" / "model_00002.pt")]
    smaller = run(["train_gpt2.py", *args, "--batch_size", "2", *resume, "--log_dir", str(tmp_path / "smaller")])
    assert smaller.returncode == 0 and "2 micro-batches of 2 x 16 on each of 1 processes" in smaller.stdout
    two = torchrun(2, [*args, "--batch_size", "4", *resume, "--log_dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr
    assert "--batch_size 4 does not divide the 2 sequences each of 2 processes adds up in a step: using 2" in two.stdout
    for d in ("smaller", "two"):  # the val loss, measured in batches of B x T, changes with B: train losses only
        assert_same_log(tmp_path / d, tmp_path / "whole", tol=1e-5, after=2, kinds=("train",))


def test_checkpoints_written_for_time_replace_each_other_and_those_for_steps_stay(tmp_path, uninterrupted):
    # every step is --checkpoint_minutes late: time checkpoints after steps 0, 1, 3 and 4, step ones after 2 and 5
    out = run(["train_gpt2.py", *TINY, "--max_steps", "6", "--checkpoint_every", "3", "--checkpoint_minutes", "1e-9",
               "--log_dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    assert [line.split("/")[-1] for line in out.stdout.splitlines() if line.startswith("saved ")] == \
        [f"model_{step:05d}.pt" for step in range(6)]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == ["model_00002.pt", "model_00005.pt"]
    assert_same_log(tmp_path, uninterrupted)  # checkpointing changes nothing of the run


def test_a_checkpoint_is_read_memory_mapped_not_into_memory(tmp_path):
    # 256 MB of weights: read whole, the process would hold as much more in memory (its resident set)
    torch.save({"model": {"w": torch.ones(64, 2**20)}, "model_config": {}}, tmp_path / "big.pt")
    code = ("import sys; from machinery.checkpoints import read_checkpoint\n"
            "def resident(): return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
            "before = resident(); c = read_checkpoint(sys.argv[1])\n"
            "assert c['model']['w'].shape == (64, 2**20)\n"
            "print((resident() - before) // 1024)")  # MiB
    out = run(["-c", code, str(tmp_path / "big.pt")])
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 32, out.stdout  # MiB more: the file is mapped, its pages read when used


class StopAfter:
    """train()'s StopRequest, as if SIGTERM arrived once the run had checked `steps` losses (one a step)."""
    steps, seen = 2, 0

    def __init__(self, log=None):
        StopAfter.seen = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def requested(self):
        return "SIGTERM" if StopAfter.seen >= StopAfter.steps else None


def test_four_stop_and_resume_cycles_leave_one_stop_checkpoint_and_the_steps_checkpoints(tmp_path, monkeypatch):
    from machinery import stopping
    real_check = stopping.stop_if_not_finite
    def counted(*args):
        StopAfter.seen += 1
        return real_check(*args)
    monkeypatch.setattr(train_gpt2, "stop_if_not_finite", counted)
    monkeypatch.setattr(train_gpt2, "StopRequest", StopAfter)
    args = [*TINY, "--max_steps", "20", "--checkpoint_every", "5", "--checkpoint_minutes", "0", "--eval_every", "1000",
            "--log_dir", str(tmp_path)]
    kept = []
    for cycle in range(4):  # each run trains 2 steps, is stopped, checkpoints; the next resumes it
        with pytest.raises(SystemExit) as e:
            train_gpt2.main([*args, "--resume", "auto"] if cycle else args)
        assert e.value.code == 75  # STOPPED
        kept.append(sorted(f for f in os.listdir(tmp_path) if f.startswith("model_")))
    # steps 0-1, 2-3, 4-5, 6-7: step 4 is --checkpoint_every's and stays; each stop's replaces the one before
    assert kept == [["model_00001.pt"], ["model_00003.pt"], ["model_00004.pt", "model_00005.pt"],
                    ["model_00004.pt", "model_00007.pt"]]
    assert (tmp_path / "STOPPED").read_text().startswith("stopped before step 8 (SIGTERM); checkpoint ")
