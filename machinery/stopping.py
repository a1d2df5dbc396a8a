"""Stop requests: a signal asks a run to finish its step, write a checkpoint and exit with STOPPED."""
import signal

# the exit code of a run that stopped because it was asked to (SIGTERM, Ctrl-C) after writing its
# checkpoint: not 0, so a script can tell it from a finished run; 75 is EX_TEMPFAIL, "try again later"
STOPPED = 75


class StopRequest:
    """While in its with block, SIGTERM (a pre-empted machine) and SIGINT (a person's Ctrl-C) set .requested:
    the loop finishes its step, checkpoints and exits. Asked twice, the user will not wait: it stops at once."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, world):
        self.world = world
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.world.print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                         "(Ctrl-C again to stop at once, without one)")

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
