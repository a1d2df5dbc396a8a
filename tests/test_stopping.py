"""Stops as clusters deliver them (machinery/stopping.py): every stop signal checkpoints, repeated ones never
escalate, long evaluations give way, and a stopped run leaves STOPPED for a requeue script to find."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import INPUT, ROOT, TINY, assert_same_log, read_log, torchrun
from machinery.stopping import AT_ONCE_AFTER, StopRequest

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def default_signals():
    """In the child, before it starts: the stop signals as a terminal leaves them, however the suite was started
    (nohup ignores SIGHUP, a background job SIGINT, and a child inherits that)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def start(cmd, **kwargs):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


def wait_for_log(log_dir, step, proc, timeout=120, kind="train"):
    """Until log_dir/log.txt holds step's train loss, or another kind of line (the run is training or evaluating,
    its handlers installed)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log_dir / "log.txt") and f"\n{step} {kind} " in "\n" + (log_dir / "log.txt").read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never logged")


class QuietWorld:
    def __init__(self):
        self.printed = []

    def print(self, text):
        self.printed.append(text)


def test_once_a_stop_is_under_way_the_exit_ignores_every_stop_signal_and_otherwise_restores_them():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        with StopRequest(QuietWorld().print) as stop:  # no stop: the handlers found are put back
            pass
        assert stop.requested is None and all(signal.getsignal(sig) is signal.SIG_DFL for sig in STOP_SIGNALS)
        world = QuietWorld()
        with StopRequest(world.print) as stop:
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C: Python runs the handler before the next line
            os.kill(os.getpid(), signal.SIGINT)  # the same keypress reaching the process twice
        assert stop.requested == "SIGINT" and len(world.printed) == 1
        # the checkpoint is written, only the exit is left: a repeat must not turn exit code 75 into a kill
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("signals", [(signal.SIGHUP,), (signal.SIGUSR1,), (signal.SIGTERM, signal.SIGTERM),
                                     (signal.SIGINT, signal.SIGINT)], ids=["hup", "usr1", "term-term", "int-int"])
def test_each_stop_signal_checkpoints_and_a_repeat_50_ms_later_changes_nothing(tmp_path, signals):
    log = tmp_path / "log"
    proc = start([sys.executable, "train_gpt2.py", *TINY, "--max_steps", "100000", "--log_dir", str(log)])
    try:
        wait_for_log(log, 1, proc)
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    name = signal.Signals(signals[0]).name
    assert proc.returncode == 75 and stderr == "", stderr  # stopped with a checkpoint: not a crash, not a kill
    assert stdout.count(f"{name}: stopping after this step, with a checkpoint") == 1
    step = int(read_log(log)[-1][0])  # the last step trained is the one the checkpoint follows
    assert read_log(log)[-1][1] == "train"
    assert sorted(os.listdir(log)) == ["STOPPED", "curves.png", "log.txt", f"model_{step:05d}.pt"]
    assert (log / "STOPPED").read_text().startswith(f"stopped before step {step + 1} ({name}); checkpoint ")


def test_a_stop_during_a_long_validation_pass_checkpoints_within_seconds(tmp_path):
    data = tmp_path / "data"  # a val split of 200,000 batches: minutes of validation before step 0 trains
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "edufineweb_val_000000.npy", rng.integers(0, 50257, 200_000 * 32 + 1, dtype=np.uint16))
    np.save(data / "edufineweb_train_000001.npy", rng.integers(0, 50257, 10_000, dtype=np.uint16))
    log = tmp_path / "log"
    proc = start([sys.executable, "train_gpt2.py", *TINY, "--data", str(data), "--max_steps", "3",
                  "--val_steps", "200000", "--log_dir", str(log)])
    try:
        for line in proc.stdout:
            if line.startswith("MFU is measured against"):  # the loop starts, with validation
                break
        time.sleep(1)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        seconds = time.time() - t0
    finally:
        proc.kill()
    assert proc.returncode == 75, stderr
    assert seconds < 30, seconds  # torchrun's kill comes about 30 s after its SIGTERM
    assert "validation: cut short, a stop was requested" in stdout and "stopped before step 0" in stdout
    # nothing trained, nothing to checkpoint: a resume starts with step 0's evaluation
    assert os.listdir(log) == ["STOPPED"]


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_two_sigterms_50_ms_apart_to_torchrun_and_its_workers_checkpoint_and_resume_exactly(tmp_path):
    args = [*TINY, "--max_steps", "40", "--checkpoint_every", "1000"]  # no checkpoint but the stop's and the last
    whole = torchrun(2, [*args, "--log_dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "train_gpt2.py", *args, "--log_dir", str(cut)])
    try:
        wait_for_log(cut, 3, proc)
        for pid in children(proc.pid):  # the workers, as a scheduler signals every process of the job
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # and torchrun, which forwards it to them once more
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert stdout.count("SIGTERM: stopping after this step, with a checkpoint") == 1  # rank 0 prints
    step = int((cut / "STOPPED").read_text().split()[3])  # "stopped before step N (SIGTERM); checkpoint ..."
    assert 4 <= step < 40 and os.path.exists(cut / f"model_{step - 1:05d}.pt")
    resumed = torchrun(2, [*args, "--log_dir", str(cut), "--resume", "auto"])
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr
    assert f"resuming at step {step}" in resumed.stdout and not os.path.exists(cut / "STOPPED")
    assert_same_log(cut, tmp_path / "whole")  # digit for digit, as if never stopped


def test_a_second_ctrl_c_seconds_after_the_first_stops_at_once_without_a_checkpoint(tmp_path):
    log = tmp_path / "log"  # 2,048 micro-batches a step: it outlasts AT_ONCE_AFTER by far
    proc = start([sys.executable, "train_gpt2.py", *TINY, "--total_batch_size", "65536", "--max_steps", "1000",
                  "--log_dir", str(log)])
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout))
    reader.start()
    try:
        wait_for_log(log, 0, proc, kind="val")  # step 0's evaluation is done: its 2,048 micro-batches begin
        proc.send_signal(signal.SIGINT)
        deadline = time.time() + 60
        while time.time() < deadline and not any("stopping after this step" in line for line in lines):
            time.sleep(0.01)  # the first is answered (a loaded machine may take a moment)
        time.sleep(AT_ONCE_AFTER + 0.3)  # a person pressing again, not the same keypress reaching it twice
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        stderr = proc.stderr.read()  # a line or two: the pipe never filled
    finally:
        proc.kill()
        reader.join()
    stdout = "".join(lines)
    assert proc.returncode == 130, stdout
    assert stderr == "interrupted: stopped at once, without a checkpoint\n"
    assert "SIGINT: stopping after this step, with a checkpoint (Ctrl-C again to stop at once" in stdout
    assert sorted(os.listdir(log)) == ["curves.png", "log.txt"]  # no checkpoint, no STOPPED, no lock left behind


def signal_during_start_up(args, sig):
    """train_gpt2.py with args, sent sig while it tokenizes its text (the train split is done, the val split under
    way): its exit code and stderr."""
    proc = start([sys.executable, "train_gpt2.py", *args])
    for line in proc.stdout:
        if "(train):" in line:
            proc.send_signal(sig)
            break
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def test_a_stop_during_start_up_exits_75_with_stopped_and_a_requeue_stopped_so_keeps_its_stopped(tmp_path):
    big, log = tmp_path / "big.txt", tmp_path / "log"
    with open(INPUT) as f:
        big.write_text(f.read() * 8)  # tokenizing it takes seconds: a window for the signal
    args = [*TINY, "--data", str(big), "--max_steps", "6", "--checkpoint_every", "1000", "--log_dir", str(log)]
    # Slurm's advance warning while a job is still starting: no traceback, no death by signal, STOPPED, exit 75
    assert signal_during_start_up(args, signal.SIGUSR1) == (75, "")
    assert (log / "STOPPED").read_text() == \
        f"stopped before step 0 (SIGUSR1); no new checkpoint: continue with --resume auto --log_dir {log}\n"
    assert sorted(os.listdir(log)) == ["STOPPED"]  # nothing trained, no lock left behind
    # requeued, it trains two steps and is stopped: its checkpoint and a new STOPPED
    proc = start([sys.executable, "train_gpt2.py", *args, "--resume", "auto"])
    wait_for_log(log, 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    log_lines = (log / "log.txt").read_text()
    saved = sorted(f for f in os.listdir(log) if f.startswith("model_"))
    assert saved and (log / "STOPPED").read_text().startswith(f"stopped before step {int(saved[0][6:11]) + 1} (SIGTERM)")
    # requeued again, and stopped (Ctrl-C this time) while starting: STOPPED stays, naming what it resumed
    assert signal_during_start_up([*args, "--resume", "auto"], signal.SIGINT) == (75, "")
    step = int(saved[0][6:11]) + 1
    assert (log / "STOPPED").read_text() == (f"stopped before step {step} (SIGINT); checkpoint {log / saved[0]}: "
                                            f"continue with --resume auto --log_dir {log}\n")
    assert sorted(f for f in os.listdir(log) if f.startswith("model_")) == saved  # nothing trained, nothing saved
    assert (log / "log.txt").read_text() == log_lines


def test_the_sbatch_templates_srun_torchrun_line_turns_slurms_sigusr1_into_a_checkpoint_stopped_and_a_requeue(
        tmp_path):
    # Slurm's parts, faked: srun runs its command (one node), scontrol names this machine and records a requeue
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\nif [ "$1" = show ]; then echo 127.0.0.1; '
                                      'else echo "$@" >> "$SCONTROL_LOG"; fi\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node001", "GPUS_PER_NODE": "2",
           "LOG_DIR": str(log), "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "PYTHONUNBUFFERED": "1"}
    flags = [a for a in TINY if a not in ("--log_dir",)]
    job = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "train.sbatch"), *flags, "--max_steps", "100000"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True, preexec_fn=default_signals)
    try:
        wait_for_log(log, 1, job, timeout=240)
        os.killpg(job.pid, signal.SIGUSR1)  # --signal=USR1@120: every process of the job, torchrun and its workers
        out, err = job.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, err[-3000:]
    # torchrun, signalled itself, reports it in a traceback of its own (SignalException); the workers end cleanly
    assert 'train_gpt2.py", line' not in err and "recvValue failed" not in err and "DistNetworkError" not in err, err
    assert "SignalException: Process" in err and "got signal: 10" in err
    stopped = (log / "STOPPED").read_text()
    assert re.fullmatch(rf"stopped before step (\d+) \(SIGUSR1\); checkpoint {re.escape(str(log))}/model_\d{{5}}\.pt: "
                        rf"continue with --resume auto --log_dir {re.escape(str(log))}\n", stopped), stopped
    assert os.path.exists(stopped.split("checkpoint ")[1].split(":")[0])  # the checkpoint it names is there
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # the job goes back in the queue
    assert not (log / "run.lock").exists()


@pytest.mark.parametrize("rank_0_leaves", ["after STOPPED", "in its checkpoint write"])
def test_a_stop_during_which_rank_0_and_its_store_are_gone_is_a_stop_on_the_other_ranks(tmp_path, rank_0_leaves):
    # as the template runs it (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: rank 0 hosts the job's store), both workers
    # get SIGUSR1 at step 2; rank 0 is gone (its node lost) right after writing STOPPED, or while it writes the
    # checkpoint. Rank 1, in leave()'s barrier or waiting for the write, finds rank 0 and the store unreachable:
    # that is the stop it was asked for, not a traceback
    wrapper = tmp_path / "rank_0_gone.py"
    wrapper.write_text(f"""import os, signal, sys, time
sys.path.insert(0, {ROOT!r})
import torch, train_gpt2
from machinery.cli import run_script
from machinery.run_dir import RunDir
get_lr, mark_stopped, save = train_gpt2.get_lr, RunDir.mark_stopped, torch.save
def signalled(step, *args):
    if step == 2:
        os.kill(os.getpid(), signal.SIGUSR1)
    return get_lr(step, *args)
def mark_stopped_and_leave(self, *args):
    mark_stopped(self, *args)
    os._exit(0)
def save_and_leave(obj, f):
    time.sleep(1)
    os._exit(0)
train_gpt2.get_lr = signalled
if os.environ["RANK"] == "0":
    RunDir.mark_stopped = mark_stopped_and_leave
    torch.save = save_and_leave if {rank_0_leaves == "in its checkpoint write"} else save
run_script(train_gpt2.main)
""")
    log = tmp_path / "log"
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    out = torchrun(2, [*TINY, "--max_steps", "6", "--log_dir", str(log)], timeout=120, env=env, script=str(wrapper))
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 0, out.stderr  # torch's own C++ warnings (TCPStore's recvValue failed) may remain
    if rank_0_leaves == "after STOPPED":  # rank 1 left the store or the barrier without rank 0: either way, quietly
        assert (log / "STOPPED").read_text().startswith("stopped before step 3 (SIGUSR1); checkpoint ")
        assert sorted(f for f in os.listdir(log) if f.startswith("model_")) == ["model_00002.pt"]
    else:
        assert "rank 1: stopping: rank 0 is gone (DistNetworkError)\n" in out.stdout, out.stdout
