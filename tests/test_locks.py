"""One writer at a time (``roar.core.locks``) and never a half-written file (``roar.core.atomic``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from roar.core.atomic import atomic_path, fsync_dir, move_into_place, replace_atomic
from roar.core.errors import RoarError
from roar.core.locks import FileLock, lock_path
from roar.core.plots import pyplot, save_figure

# --------------------------------------------------------------------------------------------- locks


def test_a_second_writer_is_refused_naming_what_is_written(tmp_path):
    target = tmp_path / "out" / "store.h5"
    with FileLock(target) as lock:
        assert lock.held and lock_path(target) == tmp_path / "out" / ".store.h5.lock"
        with pytest.raises(RoarError, match=r"^another process is writing .*store\.h5; wait for it to finish"):
            FileLock(target).acquire()
    assert not lock.held
    with FileLock(target):  # released: the next writer gets in
        pass
    assert lock_path(target).exists()  # left in place, see the module docstring


def test_a_blocking_lock_waits_for_its_turn(tmp_path):
    target = tmp_path / "results.csv"
    order = []
    first = FileLock(target).acquire()

    def second():
        with FileLock(target, blocking=True):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.2)
    order.append("first")
    first.release()
    thread.join(10)
    assert order == ["first", "second"]


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    target = tmp_path / "store.h5"
    code = (
        "import sys, time; from roar.core.locks import FileLock; "
        f"FileLock({str(target)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RoarError, match="another process is writing"):
            FileLock(target).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with FileLock(target):
        pass


# --------------------------------------------------------------------------------------- atomic files


def test_atomic_path_publishes_only_a_finished_file(tmp_path):
    target = tmp_path / "sub" / "data.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".data.bin.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["data.bin"]


def test_replace_atomic_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "summary.json"
    replace_atomic(target, lambda f: f.write(b"old"), sync_dir=True)

    def broken(f):
        f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomic(target, broken)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["summary.json"]


def test_a_finished_folder_moves_into_place(tmp_path):
    tmp = tmp_path / ".cache.tmp"
    tmp.mkdir()
    (tmp / "a.npy").write_bytes(b"x")
    move_into_place(tmp, tmp_path / "cache")
    assert (tmp_path / "cache" / "a.npy").read_bytes() == b"x" and not tmp.exists()
    fsync_dir(tmp_path / "missing")  # a no-op, not an error


def test_save_figure_writes_the_format_of_the_extension_and_leaves_nothing_else(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "curve.png")
    fig, ax = plt.subplots()
    save_figure(fig, tmp_path / "curve.pdf")
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "curve.pdf").read_bytes().startswith(b"%PDF")
    assert sorted(os.listdir(tmp_path)) == ["curve.pdf", "curve.png"]
    assert not plt.get_fignums()  # both figures closed
