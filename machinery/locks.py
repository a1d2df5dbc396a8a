"""One process at a time in a directory: a run in its --log_dir, fineweb.py in its --local_dir.

Where the file system has no flock() (some NFS and FUSE mounts answer ENOLCK, ENOSYS or EOPNOTSUPP), the lock is a
file made with O_EXCL beside it, lock_name + ".held", that names its holder: "pid P on HOST". It is stale, and taken
over, when HOST is this machine and no process P runs here; held on another machine, a second run is refused with
the file's path, to remove by hand once that run is gone. The holder removes it however its process ends, except
kill -9 or a crash of the machine: then the next run on that machine takes it over.
"""
import contextlib
import errno
import os
import socket

# what flock() raises on a file system that does not do locks
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


def holder_line():
    return f"pid {os.getpid()} on {socket.gethostname()}"


def running_here(holder):
    """Whether holder ("pid P on HOST") is a process that runs: True on another host (it cannot be checked)."""
    try:
        pid, host = holder.removeprefix("pid ").split(" on ", 1)
        pid = int(pid)
    except ValueError:
        return True  # not ours to judge: leave it to a person
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


@contextlib.contextmanager
def hold_without_flock(path, flag, directory):
    """The lock as a file made with O_EXCL (see above), held while in the with block."""
    held = path + ".held"
    while True:
        try:
            fd = os.open(held, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError), open(held) as f:
                holder = f.read().strip()
                if running_here(holder):
                    raise ValueError(f"{flag} {directory} is in use by another run ({holder or 'another process'}; "
                                     f"no flock here, so {held} is the lock): wait for it to end, or remove that "
                                     f"file if it has, or use another {flag}") from None
                os.remove(held)  # its process is gone (kill -9): stale
    try:
        os.write(fd, holder_line().encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(held)


@contextlib.contextmanager
def hold_directory(directory, flag, lock_name):
    """Hold directory for this process: made if need be, writable, and locked (directory/lock_name) so that a
    second process is refused in one line that names flag. Left as found: made for nothing, it is removed.

    flock() locks belong to the process: the OS releases them when it ends, however it ends, so a process
    killed with kill -9 never leaves the directory locked. Without flock, a lock file instead (see above).
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
        except OSError as e:
            os.close(fd)
            if e.errno not in NO_LOCKS:
                raise ValueError(f"{flag} {directory} cannot be locked ({e.strerror}): pass another directory") from None
            fd = None  # this file system does no locks
            break
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break  # else the previous holder removed the file as we opened it: lock the new one
        os.close(fd)
    try:
        if fd is None:
            with hold_without_flock(path, flag, directory):
                yield
        else:
            os.ftruncate(fd, 0)
            os.write(fd, holder_line().encode())
            yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # while still locked, so no other process can hold this file meanwhile
        if fd is not None:
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # made for a run that never wrote anything: leave no trace
