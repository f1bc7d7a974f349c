"""One job per output at a time: an exclusive ``flock`` on ``OUTPUT.lock``, held for the job's life.

The kernel drops a ``flock`` when its holder dies, however it dies, so a lock
file left behind by a killed job never blocks the next one: only a live
process holds the lock.  The holder writes its pid into the file, so the job
that is refused can say which one it waited for.  The file is removed on a
clean release; a job that opened it just before (and so locked a file no
longer there) sees the inode changed and tries again.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from opswitch.batch.errors import BatchError


class JobLock:
    """``JobLock(path)`` holds the lock or raises BatchError naming the holder's pid."""

    _fd: int | None = None

    def __init__(self, path: Path, output: Path) -> None:
        self.path = path
        for _ in range(100):  # only lost races repeat, and each needs another job finishing
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise BatchError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"pid {holder}" if holder else "another process"
                raise BatchError(f"another job ({who}) is running on {output}: wait for it to finish "
                                 "or stop it, then run again (with --resume to continue it)") from None
            except OSError:
                os.close(fd)
                raise
            if _same_file(fd, path):
                break
            os.close(fd)  # the file was removed (or replaced) after we opened it
        else:
            raise BatchError(f"cannot lock {path}: it keeps being replaced")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(fd)

    def __del__(self) -> None:  # an abandoned Job (a test's "crash") lets go of its lock
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and len(text) < 12 else None
