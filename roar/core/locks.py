"""One writer at a time: an exclusive ``flock`` on a hidden lock file next to what is written.

The lock lives in its own file, ``.<name>.lock`` beside the guarded file or folder, never on the
data itself: the data is replaced by renames (``roar.core.atomic``), which would silently drop a
lock held on the old inode, and a folder cannot be opened for writing. The lock file is left in
place when released, because deleting it would let a process that has just opened the old file
and one that creates a new one both believe they hold the lock.

``flock`` locks belong to the open file, so the kernel releases them when a process dies, even
by SIGKILL: the lock of a dead process is simply taken over by the next writer, never stale. The
holder writes its pid, host and start time into the lock file, so a refused writer can say who
holds it. By default a second writer is refused at once with a one-line RoarError (two
extractions into one store are a mistake to report, not to queue); ``blocking=True`` waits
instead, for short critical sections that processes take turns in, such as appending a line to a
shared results file. ``shared=True`` takes a shared lock: any number of shared holders, no
exclusive one (the shards of one sweep share their output folder this way).

``output_folder(folder)`` is what every stage calls before it writes: it checks the folder can be
written, takes its exclusive (or shared) lock and removes the temporary files of a killed writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from roar.core.errors import RoarError


def lock_path(path: str | Path) -> Path:
    """The lock file that guards ``path``: ``.<name>.lock`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it into the lock file ('' if unknown)."""
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


class FileLock:
    """An exclusive (or shared) lock on ``path`` (a file or folder), held from ``acquire()`` or ``with``
    until released.

    ``with FileLock(results_csv, blocking=True): ...`` for a critical section; ``acquire()`` and
    ``release()`` for a lock held as long as an object lives (a store writer).
    """

    def __init__(self, path: str | Path, *, blocking: bool = False, shared: bool = False):
        self.path = Path(path)
        self.blocking = blocking
        self.shared = shared
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FileLock:
        """Take the lock; RoarError naming ``path`` and the holder if another process holds it (unless blocking)."""
        if self._fd is not None:
            raise RuntimeError(f"the lock on {self.path} is already held by this object")
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise RoarError(f"cannot write in {parent}: {exc.strerror or exc}") from None
        kind = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, kind if self.blocking else kind | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RoarError(
                f"another process{holder} is writing {self.path}; wait for it to finish or stop it"
            ) from None
        except OSError as exc:  # a filesystem without flock support, for one
            os.close(fd)
            raise RoarError(f"cannot lock {self.path} ({exc.strerror or exc})") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._sign()
        return self

    def _sign(self) -> None:
        """Write this process's pid, host and start time into the lock file (for a refused writer's message;
        of several shared holders, the last one to arrive is named)."""
        text = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text.encode(), 0)
        except OSError:
            pass  # the message is a courtesy; the lock itself is held

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


def check_writable_folder(folder: str | Path) -> Path:
    """``folder`` as a Path if it is (or can be made) a writable folder; a one-line RoarError if not.

    Nothing is created: a path component that is a file, or an existing folder (or nearest existing
    parent) that is not writable, is reported before a stage does any work.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RoarError(f"cannot write in {folder}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise RoarError(f"cannot write in {folder}: {probe} is not writable")
    return folder


@contextlib.contextmanager
def output_folder(folder: str | Path, *, shared: bool = False) -> Iterator[Path]:
    """Hold the lock on a stage's output ``folder`` while the block writes into it.

    Exclusive by default: a second writer is refused with the holder's pid and host. With
    ``shared=True`` several cooperating writers (shards) may hold it together, but no exclusive one.
    The exclusive holder removes the temporary files that killed writers left in the folder.
    """
    folder = check_writable_folder(folder)
    with FileLock(folder, shared=shared):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno in (errno.EEXIST, errno.ENOTDIR):
                reason = "a file is in the way"
            raise RoarError(f"cannot create {folder}: {reason}") from None
        if not shared:
            from roar.core.atomic import remove_temporaries

            remove_temporaries(folder)
        yield folder
