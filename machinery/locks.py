"""One process at a time in a directory: a run in its --log_dir, fineweb.py in its --local_dir."""
import contextlib
import os
import socket


@contextlib.contextmanager
def hold_directory(directory, flag, lock_name):
    """Hold directory for this process: made if need be, writable, and locked (directory/lock_name) so that a
    second process is refused in one line that names flag. Left as found: made for nothing, it is removed.

    flock() locks belong to the process: the OS releases them when it ends, however it ends, so a process
    killed with kill -9 never leaves the directory locked.
    """
    import fcntl  # Unix only, like the rest of the multi-process tooling
    created = not os.path.exists(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{flag} {directory} is a file: pass a directory")
    path = os.path.join(directory, lock_name)
    while True:
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"{flag} {directory} cannot be written ({e.strerror}): pass a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(f"{flag} {directory} is in use by another run ({holder}): wait for it to end, "
                             f"or use another {flag}") from None
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break  # else the previous holder removed the file as we opened it: lock the new one
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    try:
        yield
    finally:
        os.remove(path)  # while still locked, so no other process can hold this file meanwhile
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # made for a run that never wrote anything: leave no trace
