"""One writer at a time (``roar.core.locks``) and never a half-written file (``roar.core.atomic``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from roar.core.atomic import atomic_path, fsync_dir, move_into_place, remove_temporaries, replace_atomic, umask
from roar.core.errors import RoarError
from roar.core.locks import FileLock, lock_path, output_folder
from roar.core.plots import pyplot, save_figure

# --------------------------------------------------------------------------------------------- locks


def test_a_second_writer_is_refused_naming_what_is_written(tmp_path):
    target = tmp_path / "out" / "store.h5"
    with FileLock(target) as lock:
        assert lock.held and lock_path(target) == tmp_path / "out" / ".store.h5.lock"
        pattern = rf"^another process \(pid {os.getpid()} on .+ since .+\) is writing .*store\.h5; wait for it"
        with pytest.raises(RoarError, match=pattern):
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
        with pytest.raises(RoarError, match=r"another process \(pid \d+ .*\) is writing"):
            FileLock(target).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with FileLock(target):
        pass


def test_shared_holders_coexist_and_keep_an_exclusive_writer_out(tmp_path):
    folder = tmp_path / "retrain"
    pattern = r"another process \(pid \d+ .*\) is writing"
    with FileLock(folder, shared=True), FileLock(folder, shared=True), pytest.raises(RoarError, match=pattern):
        FileLock(folder).acquire()
    with FileLock(folder), pytest.raises(RoarError, match="another process"):
        FileLock(folder, shared=True).acquire()


def test_output_folder_locks_cleans_temporaries_and_refuses_what_cannot_be_written(tmp_path):
    out = tmp_path / "run" / "curves"
    (out / "parts").mkdir(parents=True)
    left = [out / ".results.csv.ab12cd.tmp", out / "parts" / ".x.json.ef34.tmp", out / ".curves.png.9z.tmp.png"]
    for path in left:
        path.write_text("half")
    (out / ".jobs.h5.k1.tmp").mkdir()
    (out / "results.csv").write_text("kept")
    with output_folder(out) as folder:
        assert folder == out
        assert sorted(p.name for p in out.rglob("*")) == ["parts", "results.csv"], "killed writers' files removed"
        held = r"another process \(pid \d+ on .*\) is writing .*curves"
        with pytest.raises(RoarError, match=held), output_folder(out):
            pass
        with pytest.raises(RoarError, match="another process"), output_folder(out, shared=True):
            pass

    (tmp_path / "file").write_text("x")
    in_the_way = r"cannot write in .*file/train: .*file is a file, not a folder"
    with pytest.raises(RoarError, match=in_the_way), output_folder(tmp_path / "file" / "train"):
        pass
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        read_only = r"cannot write in .*readonly/run/train: .*readonly is not writable"
        with pytest.raises(RoarError, match=read_only), output_folder(locked / "run" / "train"):
            pass
        assert os.listdir(locked) == [], "a refused run creates nothing"
    finally:
        locked.chmod(0o755)


def test_remove_temporaries_spares_files_that_only_look_alike(tmp_path):
    keep = [tmp_path / "notes.tmp", tmp_path / "a.tmp.png", tmp_path / ".hidden"]
    for path in keep:
        path.write_text("x")
    (tmp_path / ".model.pt.3k2j.tmp").write_text("x")
    assert remove_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)


# --------------------------------------------------------------------------------------- atomic files


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert umask() == mask
        replace_atomic(tmp_path / "a.csv", lambda f: f.write(b"x"))
        with atomic_path(tmp_path / "b.h5") as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(old)
    for name in ("a.csv", "b.h5"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_figures_saved_at_once_to_one_path_never_collide(tmp_path):
    """Shards of a sweep finish together and save the same figure: every save succeeds, the PNG is whole."""
    plt = pyplot()
    errors = []

    def save(k):
        try:
            fig, ax = plt.subplots()
            ax.plot([0, k], [1, 0])
            save_figure(fig, tmp_path / "accuracy.png")
        except Exception as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert os.listdir(tmp_path) == ["accuracy.png"]
    assert (tmp_path / "accuracy.png").read_bytes().startswith(b"\x89PNG")


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
