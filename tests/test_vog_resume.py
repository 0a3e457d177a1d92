"""``roar vog`` after a kill, beside another writer, after a refusal and when its inputs change,
on a run of a few seconds (192 train and 64 test images, 3 epoch snapshots)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from roar.cli import main
from roar.config import load_config
from roar.core.locks import output_folder
from roar.training.checkpoint import save_atomic

SMOKE_SETTINGS = [
    "dataset.train_size=192",
    "dataset.test_size=64",
    "model.widths=[8,8,16]",
    "training.epochs=3",
    "vog.grid_classes=1",
    "vog.grid_k=2",
]


def _sets(data_root, run_dir) -> list[str]:
    return [f"dataset.root={data_root}", f"output_dir={run_dir}", *SMOKE_SETTINGS]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root, repo):
    """A trained tiny run and its finished ``roar vog``: the reference every resumed run must equal."""
    from roar.stages.train import run as train
    from roar.stages.vog.stage import run as vog

    run_dir = tmp_path_factory.mktemp("vog_resume") / "run"
    cfg = load_config(repo / "configs" / "smoke.yaml", _sets(data_root, run_dir))
    train(cfg)
    vog(cfg)
    return run_dir


def _copy(finished, tmp_path, vog: bool = True):
    """A copy of the finished run (its ``vog`` folder too, unless ``vog`` is False) in ``tmp_path/run``."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished / "train", run_dir / "train")
    if vog:
        shutil.copytree(finished / "vog", run_dir / "vog")
    return run_dir


def _vog(repo, data_root, run_dir, *extra: str) -> list[str]:
    sets = [*_sets(data_root, run_dir), *extra]
    return ["vog", "--config", str(repo / "configs" / "smoke.yaml"), *[a for s in sets for a in ("--set", s)]]


def _files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


# ------------------------------------------------------------------------------------------ resuming


def test_peer_chunks_saved_but_never_gathered_are_gathered_on_the_next_run(finished, repo, data_root, tmp_path, capsys):
    """A kill after the last chunk of a snapshot's peer scores was saved, before they were gathered
    into ``<snapshot>.npz``: the next run gathers them (no pass needed) and ends as an uninterrupted run."""
    run_dir = _copy(finished, tmp_path)
    peers = run_dir / "vog" / "peers" / "train"
    gathered = _npz(peers / "epoch_0001.npz")
    (peers / "epoch_0001").mkdir()
    np.savez(peers / "epoch_0001" / "000000000000.npz", **gathered)
    (peers / "epoch_0001.npz").unlink()
    (run_dir / "vog" / "scores.csv").unlink()

    assert main(_vog(repo, data_root, run_dir)) == 0, capsys.readouterr().err
    assert "(0 snapshot passes computed)" in capsys.readouterr().out
    assert not (peers / "epoch_0001").exists()
    again = _npz(peers / "epoch_0001.npz")
    assert again.keys() == gathered.keys() and all(np.array_equal(again[k], gathered[k]) for k in gathered)
    assert (run_dir / "vog" / "scores.csv").read_bytes() == (finished / "vog" / "scores.csv").read_bytes()
    assert main(_vog(repo, data_root, run_dir)) == 0  # and stays resumable
    assert (run_dir / "vog" / "scores.csv").read_bytes() == (finished / "vog" / "scores.csv").read_bytes()


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_run(finished, repo, data_root, tmp_path):
    run_dir = _copy(finished, tmp_path)
    out = run_dir / "vog"
    planted = [
        out / ".scores.csv.abc123.tmp",
        out / "peers" / "train" / ".epoch_0002.npz.abc123.tmp",
        out / "peers" / "test" / "epoch_0003" / ".000000000000.npz.x9y8z7.tmp",
        out / "grids" / ".disk.png.q1w2e3.tmp.png",
        out / "gradients" / ".test.h5.k4l5m6.tmp",
    ]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    (out / ".deciles.png.r7t8.tmp").mkdir()  # a temporary folder

    assert main(_vog(repo, data_root, run_dir)) == 0
    assert not [p for p in planted if p.exists()] and not (out / ".deciles.png.r7t8.tmp").exists()
    assert not list(out.rglob("*.tmp*"))
    assert (out / "scores.csv").read_bytes() == (finished / "vog" / "scores.csv").read_bytes()


# ------------------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_and_changes_nothing(finished, repo, data_root, tmp_path):
    """Two ``roar vog`` on one run: while one holds ``<run>/vog``, the other exits 2 naming it, and
    leaves every file as it was (config.yaml and provenance.json included)."""
    run_dir = _copy(finished, tmp_path)
    with output_folder(run_dir / "vog"):
        before = _files(run_dir)
        proc = subprocess.run(
            [sys.executable, "-m", "roar", *_vog(repo, data_root, run_dir)],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=900,
        )
        after = _files(run_dir)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: another process (pid {os.getpid()} on "), line
    assert f"is writing {run_dir / 'vog'}" in line
    assert after == before
    assert (run_dir / "vog" / "scores.csv").read_bytes() == (finished / "vog" / "scores.csv").read_bytes()


@pytest.mark.parametrize("with_vog", [True, False], ids=["finished", "new"])
def test_a_refused_run_writes_nothing(finished, repo, data_root, tmp_path, capsys, with_vog):
    """Every check (config against the snapshots, snapshots against the model) comes before the lock
    and the first write: a refused run leaves no config, provenance, identity or lock file behind."""
    run_dir = _copy(finished, tmp_path, vog=with_vog)
    before = _files(run_dir)
    assert main(_vog(repo, data_root, run_dir, "vog.el2n_snapshot=7")) == 2
    assert "vog.el2n_snapshot: 7 is outside" in capsys.readouterr().err
    assert main(_vog(repo, data_root, run_dir, "vog.stages={a: [0, 5]}")) == 2
    assert "vog.stages.a: positions [5]" in capsys.readouterr().err
    save_atomic(
        {"model": torch.nn.Linear(3, 2).state_dict(), "epoch": 2, "step": 6},
        run_dir / "train" / "snapshots" / "epoch_0002.pt",
    )
    before["train/snapshots/epoch_0002.pt"] = (run_dir / "train" / "snapshots" / "epoch_0002.pt").read_bytes()
    assert main(_vog(repo, data_root, run_dir)) == 2
    assert "does not fit the model" in capsys.readouterr().err
    assert _files(run_dir) == before
    assert (run_dir / "vog").exists() == with_vog


# --------------------------------------------------------------------------------- changed inputs


def test_results_of_other_snapshots_are_recomputed_and_the_line_says_so(finished, repo, data_root, tmp_path, capsys):
    """Snapshots changed since the last run (a retrained run): the stored gradients and cached peer
    scores are discarded and recomputed, never refused nor kept, and the result equals a fresh run's."""
    changed = _copy(finished, tmp_path / "changed")
    fresh = _copy(finished, tmp_path / "fresh", vog=False)
    for run_dir in (changed, fresh):
        path = run_dir / "train" / "snapshots" / "epoch_0002.pt"
        state = torch.load(path, weights_only=True)
        state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
        save_atomic(state, path)

    assert main(_vog(repo, data_root, changed)) == 0, capsys.readouterr().err
    line = capsys.readouterr().out.strip()
    for split in ("train", "test"):
        assert f"gradients of {split} recomputed: snapshots changed" in line
        assert f"peer scores of {split} recomputed: snapshots changed" in line
    assert "(6 snapshot passes computed)" in line
    assert main(_vog(repo, data_root, fresh)) == 0
    assert "recomputed" not in capsys.readouterr().out
    assert (changed / "vog" / "scores.csv").read_bytes() == (fresh / "vog" / "scores.csv").read_bytes()
    assert (changed / "vog" / "scores.csv").read_bytes() != (finished / "vog" / "scores.csv").read_bytes()
    assert main(_vog(repo, data_root, changed)) == 0
    assert "recomputed" not in capsys.readouterr().out


def test_a_peer_cache_recorded_for_other_snapshots_is_recomputed_alone(finished, repo, data_root, tmp_path, capsys):
    run_dir = _copy(finished, tmp_path)
    record = run_dir / "vog" / "peers" / "train" / "identity.json"
    original = record.read_text()
    record.write_text(original.replace('"snapshots": "', '"snapshots": "0000'))

    assert main(_vog(repo, data_root, run_dir)) == 0, capsys.readouterr().err
    line = capsys.readouterr().out.strip()
    assert line.endswith("; peer scores of train recomputed: snapshots changed"), line
    assert "(3 snapshot passes computed)" in line  # forward passes of the train split only
    assert record.read_text() == original
    assert (run_dir / "vog" / "scores.csv").read_bytes() == (finished / "vog" / "scores.csv").read_bytes()
