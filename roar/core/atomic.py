"""Files that are either absent, old or new, never half-written.

Everything roar writes that a later run reads back (checkpoints, configs, summaries, store
chunks, figures, dataset caches) is written under a temporary name in the target's folder,
fsynced and renamed over the target: a kill at any moment leaves no torn file that looks
complete, only a hidden ``.<name>.*.tmp`` that the next writer may delete.

* ``replace_atomic(path, write)`` for writers that take an open binary file;
* ``atomic_path(path)`` for libraries that insist on writing by file name (HDF5, matplotlib);
* ``move_into_place(tmp, path)`` to publish a finished temporary file or folder;
* ``fsync_dir(folder)`` to make the renames in a folder durable.

The rename itself is what makes a write atomic; fsyncing the folder only fixes *when* a rename
survives a power loss. Callers that use a file's existence to order later steps (the array
store's consolidation) ask for it; writers of many small files (store chunks) do not, since a
lost chunk is only recomputed.

This is the only module that renames files into place, so the temporary names, the fsync and the
clean-up of a failed write are the same everywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(folder: str | Path) -> None:
    """Make the entries of ``folder`` (a rename, a new file) durable; a no-op where folders cannot be fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def move_into_place(tmp: str | Path, path: str | Path, *, sync_dir: bool = True) -> None:
    """Fsync the finished temporary file or folder ``tmp`` and rename it over ``path`` (same filesystem).

    A folder can only replace a missing or empty folder. With ``sync_dir`` the rename is made durable.
    """
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir():
        fsync_dir(tmp)
    else:
        _fsync_file(tmp)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's file mode creation mask (read by setting it and setting it back)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _temporary(path: Path, suffix: str) -> Path:
    """A new empty temporary file next to ``path``, with the permissions the umask gives a new file.

    ``mkstemp`` creates it readable by its owner only; the results of a shared cluster folder must
    be readable by whoever the umask allows, like any file the user creates.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)
    return Path(tmp)


def temporary_folder(path: str | Path) -> Path:
    """A new empty temporary folder next to ``path`` (``.<name>.<random>.tmp``), with the umask's permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


TEMPORARY = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")
"""The names this module gives temporary files and folders: ``.<name>.<random>.tmp[.<ext>]``."""


def remove_temporaries(folder: str | Path) -> int:
    """Delete the temporary files and folders that killed writers left anywhere under ``folder``.

    Only safe while holding the folder's lock (``roar.core.locks.output_folder``): a live writer's
    temporary file would be deleted under it. Returns how many were removed.
    """
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for root, dirs, files in os.walk(folder):
        for name in [d for d in dirs if TEMPORARY.match(d)]:
            shutil.rmtree(Path(root) / name, ignore_errors=True)
            dirs.remove(name)
            removed += 1
        for name in files:
            if TEMPORARY.match(name):
                (Path(root) / name).unlink(missing_ok=True)
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp", sync_dir: bool = True) -> Iterator[Path]:
    """A temporary file name next to ``path`` to write by name; moved over ``path`` when the block ends.

    The name is ``.<name>.<random><suffix>`` (``suffix`` must end in ``.tmp`` or, for libraries that
    choose the format by extension, ``.tmp.<ext>``). If the block raises, the temporary file is removed
    and ``path`` is untouched.
    """
    path = Path(path)
    tmp = _temporary(path, suffix)
    try:
        yield tmp
        move_into_place(tmp, path, sync_dir=sync_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_atomic(path: str | Path, write: Callable[[BinaryIO], object], *, sync_dir: bool = False) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    tmp = _temporary(path, ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    replace_atomic(path, lambda f: f.write(text.encode()))
