"""One writer per run folder: an OS lock on the folder itself, held for the run's life.

lock_run_dir() takes an exclusive flock(2) on the run folder's own file descriptor (no lock file
to leave behind or to list); the kernel releases it when the process ends, however it ends, so a
crash or kill -9 never leaves a stale lock. A second process asking for the same folder gets a
CharlmError naming the holder's PID (read from /proc/locks on Linux). On a file system without
locks (some network mounts) the run goes on unlocked, as before.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import CharlmError


class RunLock:
    """A held lock (or, on a file system without locks, a note that none could be taken)."""

    def __init__(self, fd: int | None, path: Path):
        self.fd, self.path = fd, path

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def lock_run_dir(path: str | os.PathLike, what: str = "run folder") -> RunLock:
    """An exclusive lock on the folder path (which must exist); CharlmError if another process holds it."""
    import fcntl
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CharlmError(f"cannot open {what} {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)  # no locks on this file system: go on as without them
            return RunLock(None, path)
        st = os.fstat(fd)
        os.close(fd)
        pid = holder_pid(st.st_dev, st.st_ino)
        who = f"another charlm process (PID {pid})" if pid else "another charlm process"
        raise CharlmError(f"{what} {path} is in use by {who}: two runs writing one folder would overwrite each "
                          f"other's checkpoints; wait for it to finish, or give another --out") from None
    return RunLock(fd, path)


def busy(path: str | os.PathLike) -> int | bool:
    """Whether another process holds the lock on folder path: its PID if known, True if held by an
    unknown process, False if free (or the folder cannot be opened, or locks are not supported).
    Takes the lock for an instant to find out, and releases it at once."""
    try:
        lock_run_dir(path).release()
    except CharlmError as e:
        if "in use by" not in str(e):
            return False
        try:
            st = os.stat(path)
            return holder_pid(st.st_dev, st.st_ino) or True
        except OSError:
            return True
    return False


def holder_pid(dev: int, ino: int) -> int | None:
    """The PID holding a flock on the file (dev, ino), from Linux's /proc/locks; None if unknown."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (a waiter has "->" after the number)
                if "FLOCK" in parts and want in parts:
                    pid = parts[parts.index(want) - 1]
                    return int(pid) if pid.isdigit() and int(pid) > 0 else None
    except OSError:
        pass
    return None
