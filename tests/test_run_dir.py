"""The --log_dir a run owns (machinery/run_dir.py): its lock, checkpoint names and curves.png."""
import os
import subprocess
import sys

import pytest
import torch

import train_gpt2
from conftest import DDP, SMALL, read_log
from machinery import run_dir
from machinery.run_dir import RunDir, plot_curves, read_curves


def test_a_read_only_log_dir_is_refused(tmp_path, monkeypatch):
    real_open = os.open
    def read_only(path, *args):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args)
    monkeypatch.setattr(run_dir.os, "open", read_only)
    with pytest.raises(ValueError, match=r"--log_dir .* cannot be written \(Permission denied\): pass a writable"):
        with RunDir(str(tmp_path)).claim():
            pass


def test_resume_auto_picks_the_newest_checkpoint_by_step_number(tmp_path):
    for name in ("model_09999.pt", "model_99999.pt", "model_100000.pt", "model_20000.pt", "model_x.pt"):
        (tmp_path / name).write_bytes(b"")
    assert RunDir(str(tmp_path)).checkpoints()[0] == str(tmp_path / "model_100000.pt")  # by name: model_99999.pt
    assert [os.path.basename(p) for p in RunDir(str(tmp_path)).checkpoints()] == [
        "model_100000.pt", "model_99999.pt", "model_20000.pt", "model_09999.pt"]


def test_each_evaluation_draws_the_curves_as_a_png(tmp_path):
    import matplotlib.image
    train_gpt2.main([*DDP, "--log_dir", str(tmp_path)])  # val and HellaSwag at steps 0, 2 and 4
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp"))
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (360, 960)  # 12 x 4.5 inches at 80 dpi
    # matplotlib's first colour (#1f77b4), antialiased: the train loss line on the left, HellaSwag's on the right
    blue = (abs(pixels[..., :3] - torch.tensor([0x1f, 0x77, 0xb4]).numpy() / 255) < 0.1).all(-1)
    assert blue[:, :480].sum() > 30 and blue[:, 480:].sum() > 100
    # what is drawn is the log: every train, val and hella value at its step, beside the baselines
    log = read_log(tmp_path)
    fig = plot_curves(read_curves(tmp_path / "log.txt"))
    loss, hella = fig.axes
    drawn = {line.get_label(): line.get_xydata().tolist() for ax in fig.axes for line in ax.lines}
    for kind in ("train", "val", "hella"):
        assert drawn[kind] == [[int(s), float(v)] for s, k, v in log if k == kind], kind
    assert [line.get_ydata()[0] for line in hella.lines[1:]] == [0.2945, 0.337]
    assert loss.lines[2].get_ydata()[0] == 3.2924 and len(drawn["train"]) == 5


def test_a_curves_png_that_cannot_be_drawn_is_one_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def full_disk(curves):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(run_dir, "plot_curves", full_disk)
    train_gpt2.main([*SMALL, "--max_steps", "3", "--eval_every", "1", "--val_steps", "1", "--log_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("curves.png: not drawn ([Errno 28] No space left on device); training goes on") == 3
    assert [k for _, k, _ in read_log(tmp_path)].count("train") == 3  # every step ran


def test_a_claim_removes_only_the_half_written_files_of_this_project(tmp_path):
    # a shared folder (--log_dir .) holds other programs' .tmp files, even directories: they are not ours
    (tmp_path / "thesis.tmp").write_text("a user's draft")
    (tmp_path / "build.tmp").mkdir()
    (tmp_path / "model_00009.dcp.tmp").mkdir()  # our name, but a user's file inside: not a save of ours
    (tmp_path / "model_00009.dcp.tmp" / "notes.txt").write_text("mine")
    for name in ("model_00007.pt.tmp", "log.txt.tmp", "curves.png.tmp", "STOPPED.tmp"):
        (tmp_path / name).write_bytes(b"half of it")  # left by a run that died writing them
    (tmp_path / "model_00008.dcp.tmp").mkdir()  # a sharded save that died halfway
    (tmp_path / "model_00008.dcp.tmp" / "__1_0.distcp").write_bytes(b"half of it")
    with RunDir(str(tmp_path)).claim():
        assert sorted(os.listdir(tmp_path)) == ["build.tmp", "model_00009.dcp.tmp", "run.lock", "thesis.tmp"]
    assert (tmp_path / "thesis.tmp").read_text() == "a user's draft"
    assert (tmp_path / "model_00009.dcp.tmp" / "notes.txt").read_text() == "mine"


def test_a_log_line_that_cannot_be_written_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    real_open = open
    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith("log.txt") and "a" in mode:
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(run_dir, "open", full_disk, raising=False)  # what RunDir opens, and nothing else
    train_gpt2.main([*SMALL, "--max_steps", "3", "--eval_every", "1", "--val_steps", "1", "--log_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count(f"{tmp_path}/log.txt: not written from step 0 on ([Errno 28] No space left on device); "
                     "training goes on") == 1
    assert "step     2 |" in out and sorted(os.listdir(tmp_path)) == ["model_00002.pt"]  # trained and checkpointed


def test_where_the_file_system_has_no_flock_a_lock_file_holds_the_log_dir_and_a_stale_one_is_taken_over(tmp_path,
                                                                                                        monkeypatch):
    import errno, fcntl, socket
    from machinery import locks
    def no_locks(fd, op):  # as some NFS and FUSE mounts answer
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    log_dir = tmp_path / "log"
    train_gpt2.main([*SMALL, "--max_steps", "1", "--log_dir", str(log_dir)])  # the run starts, trains and ends
    assert sorted(os.listdir(log_dir)) == ["curves.png", "log.txt", "model_00000.pt"]  # no lock left behind
    held = tmp_path / "d" / "run.lock.held"
    with locks.hold_directory(str(tmp_path / "d"), "--log_dir", "run.lock"):
        assert held.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(ValueError) as e:  # a second holder, while this process runs
            with locks.hold_directory(str(tmp_path / "d"), "--log_dir", "run.lock"):
                pass
        assert str(e.value) == (f"--log_dir {tmp_path / 'd'} is in use by another run (pid {os.getpid()} on "
                                f"{socket.gethostname()}; no flock here, so {held} is the lock): wait for it to end, "
                                "or remove that file if it has, or use another --log_dir")
    assert not (tmp_path / "d").exists()  # made for nothing, left as found
    # a holder killed with kill -9 on this machine: its pid runs no more, so the next run takes the lock over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "run.lock.held").write_text(f"pid {dead.stdout.strip()} on {socket.gethostname()}")
    with locks.hold_directory(str(tmp_path / "e"), "--log_dir", "run.lock"):
        assert (tmp_path / "e" / "run.lock.held").read_text().startswith(f"pid {os.getpid()} ")
    assert os.listdir(tmp_path / "e") == []
    # held on another machine: it cannot be checked, so it is refused, with the file to remove
    (tmp_path / "e" / "run.lock.held").write_text("pid 1 on another-node")
    with pytest.raises(ValueError, match=r"in use by another run \(pid 1 on another-node; no flock here"):
        with locks.hold_directory(str(tmp_path / "e"), "--log_dir", "run.lock"):
            pass
