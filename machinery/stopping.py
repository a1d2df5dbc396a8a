"""Stop requests: a signal asks a run to finish its step, write a checkpoint and exit with STOPPED.

Clusters deliver stops in several ways: SIGTERM (a scheduler pre-empting the job, systemd, `kill`; torchrun
forwards it to its workers, which may also get it directly: two SIGTERMs), SIGUSR1 (Slurm's advance
warning, `--signal=USR1@120`), SIGHUP (the ssh session that started the run dropped), SIGINT (a person's
Ctrl-C, which a terminal sends to torchrun and its workers alike). All of them mean one thing: checkpoint,
then exit. Only a person asks twice on purpose: a second Ctrl-C, AT_ONCE_AFTER seconds or more after the
first, stops at once, without a checkpoint.
"""
import os
import signal
import sys
import time

import torch

# the exit code of a run that stopped because it was asked to, after writing its checkpoint: not 0, so a
# script can tell it from a finished run; 75 is EX_TEMPFAIL, "try again later"
STOPPED = 75
# a second Ctrl-C sooner than this after the first is the same keypress reaching the process twice
AT_ONCE_AFTER = 2.0


def stop_if_not_finite(loss, step, log_dir):
    """A loss that is inf or nan ends the run before the weights are updated: every rank sees the same reduced loss,
    so all of them stop together."""
    if not torch.isfinite(loss):
        sys.exit(f"error: the loss is {loss.item()} at step {step}: stopping before the weights are updated; the "
                 f"checkpoints already in {log_dir} are untouched (try a lower --max_lr)")


class StopRequest:
    """While in its with block, the signals above set .requested (the signal's name): the loop finishes its
    step, checkpoints and exits; during the start-up (main() holds it from its start), the run stops before its
    first step, with STOPPED. A signal the process was started ignoring (nohup, a background job's Ctrl-C) stays
    ignored. log: how to say so (default: print, on rank 0 alone, which RANK tells before any process group)."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)

    def __init__(self, log=None):
        self.log = log or (lambda line: print(line) if os.environ.get("RANK", "0") == "0" else None)
        self.requested = None
        self.first_ctrl_c = None  # when the first SIGINT came

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            if self.first_ctrl_c is not None and time.monotonic() - self.first_ctrl_c >= AT_ONCE_AFTER:
                raise KeyboardInterrupt  # asked again: the user will not wait for the checkpoint
            self.first_ctrl_c = self.first_ctrl_c or time.monotonic()
        if signum == signal.SIGHUP and sys.stdout.isatty():  # the terminal is gone: writing to it would fail
            sys.stdout = sys.stderr = open(os.devnull, "w")
        if self.requested:
            return  # the stop is under way: a repeated signal changes nothing
        self.requested = name
        self.log(f"\n{name}: stopping after this step, with a checkpoint (Ctrl-C again to stop at once, "
                 "without one)")

    def __enter__(self):
        self.previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        for sig, previous in self.previous.items():
            if previous is not signal.SIG_IGN:
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            # once stopping, the checkpoint is written and only the exit is left: a SIGTERM still on its way
            # (torchrun forwards one), or the same Ctrl-C reaching the process twice, must not turn exit code
            # STOPPED into a kill (Python hands signals back to the default action while it shuts down)
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)
