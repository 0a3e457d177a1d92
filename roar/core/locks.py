"""One writer at a time: an exclusive ``flock`` on a hidden lock file next to what is written.

The lock lives in its own file, ``.<name>.lock`` beside the guarded file or folder, never on the
data itself: the data is replaced by renames (``roar.core.atomic``), which would silently drop a
lock held on the old inode, and a folder cannot be opened for writing. The lock file is left in
place when released, because deleting it would let a process that has just opened the old file
and one that creates a new one both believe they hold the lock.

``flock`` locks belong to the open file, so the kernel releases them when a process dies, even
by SIGKILL: a killed writer never leaves a stale lock behind. By default a second writer is refused
at once with a one-line RoarError (two extractions into one store are a mistake to report, not to
queue); ``blocking=True`` waits instead, for short critical sections that processes take turns in,
such as appending a line to a shared results file.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from roar.core.errors import RoarError


def lock_path(path: str | Path) -> Path:
    """The lock file that guards ``path``: ``.<name>.lock`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


class FileLock:
    """An exclusive lock on ``path`` (a file or folder), held from ``acquire()`` or ``with`` until released.

    ``with FileLock(results_csv, blocking=True): ...`` for a critical section; ``acquire()`` and
    ``release()`` for a lock held as long as an object lives (a store writer).
    """

    def __init__(self, path: str | Path, *, blocking: bool = False):
        self.path = Path(path)
        self.blocking = blocking
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FileLock:
        """Take the lock; RoarError naming ``path`` if another process holds it (unless blocking)."""
        if self._fd is not None:
            raise RuntimeError(f"the lock on {self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RoarError(f"another process is writing {self.path}; wait for it to finish or stop it") from None
        except OSError as exc:  # a filesystem without flock support, for one
            os.close(fd)
            raise RoarError(f"cannot lock {self.path} ({exc.strerror or exc})") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the next writer in; a no-op if the lock is not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
