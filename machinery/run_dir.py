"""The --log_dir a run owns: its lock, log.txt, its checkpoints' names, curves.png, and its temporary files.

One object, RunDir, is the only code that knows these names. Every rank has one; only the rank that
writes (rank 0) touches the disk through it.
"""
import contextlib
import os
import re
import shutil

from machinery.cli import error_text
from machinery.locks import hold_directory

# what a GPT-2 124M run aims for: OpenAI's checkpoint's val loss on the FineWeb-Edu val shard, and the
# HellaSwag acc_norm of GPT-2 124M and of GPT-3 Small (from its paper)
BASELINES = {"val": [("OpenAI GPT-2 124M (FineWeb-Edu val)", 3.2924)],
             "hella": [("OpenAI GPT-2 124M", 0.2945), ("GPT-3 Small (paper)", 0.337)]}
# model_{step:05d}.pt, one file, or model_{step:05d}.dcp, a directory of every rank's shards: the step it follows
CHECKPOINT_NAME = re.compile(r"model_(\d+)\.(pt|dcp)")
# what a run writes under a temporary name, then renames: one of these names left behind is half-written
TEMPORARY_NAME = re.compile(r"(model_\d+\.pt|log\.txt|curves\.png|STOPPED)\.tmp")
TEMPORARY_SHARDS = re.compile(r"model_\d+\.dcp\.tmp")  # a directory, holding only what a sharded save writes


class RunDir:
    def __init__(self, path, writes=True):
        self.path = path
        self.writes = writes  # rank 0 writes; the other ranks only read through it
        self.log_file = os.path.join(path, "log.txt")
        self.stopped_file = os.path.join(path, "STOPPED")  # there while the run stopped on request may resume
        self.trained = False  # whether this run has logged a trained step
        self.log_failed = False  # a log line could not be written: said once

    def checkpoint_path(self, step, sharded=False):
        """Where the checkpoint written after step goes."""
        return os.path.join(self.path, f"model_{step:05d}.{'dcp' if sharded else 'pt'}")

    def checkpoints(self):
        """The checkpoints here, newest first: by step number, not by name (past step 99,999 the names outgrow their
        zero padding)."""
        names = os.listdir(self.path) if os.path.isdir(self.path) else []
        steps = {int(m.group(1)): name for name in names if (m := CHECKPOINT_NAME.fullmatch(name))}
        return [os.path.join(self.path, steps[step]) for step in sorted(steps, reverse=True)]

    @contextlib.contextmanager
    def claim(self):
        """Hold the directory for this run (see locks.py): a second run there is refused. What a run that died
        left half-written goes; nothing else does."""
        with hold_directory(self.path, "--log_dir", "run.lock"):
            for name in os.listdir(self.path):  # a shared folder may hold other programs' .tmp files: only ours go
                path = os.path.join(self.path, name)  # half-written by a run that died writing it
                if TEMPORARY_NAME.fullmatch(name) and os.path.isfile(path):
                    os.remove(path)
                elif TEMPORARY_SHARDS.fullmatch(name) and is_sharded_save(path):
                    shutil.rmtree(path)
            yield

    def check_new_run(self):
        """A run that does not resume must not write into another run's log."""
        if os.path.exists(self.log_file):
            raise ValueError(f"{self.log_file} exists: continue that run with --resume auto, or start this one "
                             "in another --log_dir")

    def start_log(self, start_step):
        """Make log.txt agree with a run that starts at start_step: lines of steps it will run again go.

        A run killed after logging a step but before its checkpoint would log that step twice on
        resume. The whole earlier log is kept beside it (log.txt.1, .2, ...) before anything is dropped.
        """
        log_file = self.log_file
        if not self.writes or not os.path.exists(log_file):
            return
        with open(log_file, errors="surrogateescape") as f:  # a damaged byte is kept as it is, not a crash
            lines = f.readlines()
        keep = [l for l in lines if not l.split()[:1] or not l.split()[0].isdigit() or int(l.split()[0]) < start_step]
        if len(keep) == len(lines):
            return
        n = 1
        while os.path.exists(f"{log_file}.{n}"):
            n += 1
        os.replace(log_file, f"{log_file}.{n}")
        with open(log_file + ".tmp", "w", errors="surrogateescape") as f:
            f.writelines(keep)
        os.replace(log_file + ".tmp", log_file)
        print(f"{log_file}: {len(lines) - len(keep)} lines of step {start_step} on set aside (this run logs them "
              f"again); the earlier log is kept whole as {log_file}.{n}")

    def mark_stopped(self, next_step, reason, checkpoint):
        """STOPPED: this run stopped on request before next_step, its checkpoint (the newest, or None) written; a new
        run here removes it."""
        if self.writes:
            saved = f"checkpoint {checkpoint}" if checkpoint else "no new checkpoint"
            with open(self.stopped_file + ".tmp", "w") as f:
                f.write(f"stopped before step {next_step} ({reason}); {saved}: continue with --resume auto "
                        f"--log_dir {self.path}\n")
            os.replace(self.stopped_file + ".tmp", self.stopped_file)

    def log(self, step, kind, value):
        """A line of log.txt: only ever appended to (a resumed run adds lines). A line that cannot be written
        (a full disk) is said once, not fatal: the checkpoints are what a run must not lose."""
        if self.writes:
            if kind == "train" and not self.trained:  # a run that stopped, resumed, trains again: STOPPED stands no
                self.trained = True  # more (a stop or a refusal before this step leaves it, or rewrites it)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.stopped_file)
            try:
                with open(self.log_file, "a") as f:
                    f.write(f"{step} {kind} {value}\n")
            except OSError as e:
                if not self.log_failed:
                    print(f"{self.log_file}: not written from step {step} on ({error_text(e)}); training goes on")
                self.log_failed = True

    def draw_curves(self):
        """curves.png, drawn from log.txt: a run on a remote machine can be looked at as an image. A picture is
        never worth the run: if it cannot be drawn (a full disk, a broken matplotlib), one line says so."""
        if not self.writes:
            return
        try:
            fig = plot_curves(read_curves(self.log_file))
            tmp = os.path.join(self.path, "curves.png.tmp")  # then renamed: a viewer never opens half an image
            fig.savefig(tmp, format="png", dpi=80)
            os.replace(tmp, os.path.join(self.path, "curves.png"))
        except Exception as e:
            print(f"curves.png: not drawn ({error_text(e)}); training goes on")


def read_curves(log_file):
    """A run's log.txt as {kind: {step: value}}, for train (loss), val (loss) and hella (acc_norm)."""
    curves = {"train": {}, "val": {}, "hella": {}}
    with open(log_file, errors="replace") as f:
        for line in f:
            step, kind, value = line.split()
            curves[kind][int(step)] = float(value)
    return curves


def plot_curves(curves):
    """The train and val loss, and HellaSwag, each against its BASELINES: a matplotlib Figure."""
    from matplotlib.figure import Figure  # imported here: only plotting needs matplotlib, and it takes 0.6 s
    fig = Figure(figsize=(12, 4.5), layout="tight")
    for ax, kinds, baselines, title in zip(fig.subplots(1, 2), (("train", "val"), ("hella",)),
                                           (BASELINES["val"], BASELINES["hella"]), ("loss", "HellaSwag acc_norm")):
        for kind in kinds:
            steps = sorted(curves[kind])
            ax.plot(steps, [curves[kind][s] for s in steps], marker="." if kind != "train" else None, label=kind)
        for (name, value), color in zip(baselines, ("tab:red", "tab:green")):
            ax.axhline(value, color=color, linestyle="--", label=name)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    return fig


def is_sharded_save(path):
    """Whether path is a directory holding nothing but what torch.distributed.checkpoint (and meta.pt) write."""
    return os.path.isdir(path) and all(name in (".metadata", "meta.pt") or name.endswith(".distcp")
                                       for name in os.listdir(path))


def remove_checkpoint(path):
    """A checkpoint of this run gone: a file, or a directory of shards."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)

