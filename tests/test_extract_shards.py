"""``roar extract --shard i/n``: shard stores over contiguous rows, stitched by HDF5 virtual datasets
into a store that equals a single process's bit for bit."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import run_copy

from roar.core.errors import RoarError
from roar.stages import extract
from roar.store import MapStore
from roar.store.shards import shard_path, shard_ranges
from roar.training import distributed

# Stochastic methods included: their per-batch random streams must be the ones a single process draws.
SETS = [
    "attribution.methods=[gradient, {name: smoothgrad, samples: 2}, random, ground_truth]",
    "attribution.splits=[test]",
    "attribution.batch_size=64",
]


@pytest.fixture
def small_chunks(monkeypatch):
    """32 rows per chunk (32×32 float16 maps), so the 256 test images make 4 batches of 64."""
    monkeypatch.setattr("roar.store.format.CHUNK_BYTES", 32 * 32 * 32 * 2)


def trained_run_split(cfg):
    from roar.data import build_dataset

    return build_dataset(cfg.dataset).split("test")


def _store(cfg):
    return MapStore.open(extract.store_path(cfg, "test"))


def test_two_shards_merged_equal_one_process_bit_for_bit(trained_run, tmp_path, small_chunks):
    single, _ = run_copy(trained_run, tmp_path, "single", SETS)
    sharded, _ = run_copy(trained_run, tmp_path, "sharded", SETS)
    extract.run(single)
    first = extract.run(sharded, "0/2")
    assert first["shard"]["merged"] == [] and not extract.store_path(sharded, "test").exists()
    assert "waiting for the other shards" in first.summary()
    second = extract.run(sharded, "1/2")
    assert "shards merged" in second.summary()
    path = extract.store_path(sharded, "test")
    with h5py.File(path) as f:
        assert f["maps/gradient"].is_virtual and not f["labels"].is_virtual
    with _store(single) as a, _store(sharded) as b:
        assert b.n == a.n == 256 and b.methods == a.methods
        for key in ("labels", "predictions", "indices"):
            assert np.array_equal(getattr(a, key), getattr(b, key)), key
        rows = np.arange(a.n)
        for method in a.methods:
            assert np.array_equal(a.read_rows(method, rows), b.read_rows(method, rows)), method
            assert a.digest(method) == b.digest(method), method
            assert [r for r, _ in b.read_chunks(method)] == [r for r, _ in a.read_chunks(method)]
    # the retraining loaders read the stitched store as they read any other: same chunks, same masks
    import torch

    from roar.stages.retrain.data import _removal_masks, _validated_layout

    split = trained_run_split(single)
    stores = [extract.store_path(c, "test") for c in (single, sharded)]
    layouts = [_validated_layout(split, p, "gradient", "pixel", "shapes", "test") for p in stores]
    assert layouts == [32, 32]
    masks = [_removal_masks(p, "random", 256, 0.5, "roar", 0, "pixel", torch.device("cpu")) for p in stores]
    assert torch.equal(*masks)


def test_a_missing_or_foreign_shard_is_named_and_roar_merge_stitches_by_hand(trained_run, tmp_path, small_chunks):
    cfg, _ = run_copy(trained_run, tmp_path, "run", SETS)
    extract.run(cfg, "1/2")
    with pytest.raises(RoarError, match=r"shard 0 of 2 \(test.shard-0-of-2.h5\) is missing; run roar extract"):
        extract.merge_shards(cfg, 2)
    extract.run(cfg, "0/2")  # the last to finish merges
    path = extract.store_path(cfg, "test")
    path.unlink()
    assert extract.merge_shards(cfg, 2) == [path]
    with MapStore.open(path) as store:
        assert store.n == 256
    shard_path(path, 1, 2).rename(shard_path(path, 1, 3))
    with pytest.raises(RoarError, match="shard 1 of 2"):
        extract.merge_shards(cfg, 2)


def test_shards_are_whole_batches_with_no_row_missing_or_doubled():
    assert shard_ranges(256, 64, 2) == [(0, 128), (128, 256)]
    assert shard_ranges(250, 64, 3) == [(0, 64), (64, 128), (128, 250)]
    ranges = shard_ranges(1000, 7, 6)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000
    assert all(a[1] == b[0] and a[0] % 7 == 0 for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(RoarError, match="5 shards for 4 batches"):
        shard_ranges(256, 64, 5)


def test_too_many_shards_or_an_existing_store_are_refused_before_writing(trained_run, tmp_path, small_chunks):
    cfg, _ = run_copy(trained_run, tmp_path, "run", SETS)
    with pytest.raises(RoarError, match="--shard 0/5: split 'test'"):
        extract.run(cfg, "0/5")
    assert not (cfg.run_dir / "attributions").exists()
    with pytest.raises(RoarError, match="expected I/N"):
        extract.run(cfg, "2/2")
    extract.run(cfg)
    with pytest.raises(RoarError, match="shards write a new store"):
        extract.run(cfg, "0/2")


def test_torchrun_ranks_are_shards(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.torchrun_shard() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.torchrun_shard() == "3/4"


# ------------------------------------------------------------------------------------------------ Slurm


def _array(script: str, count: int, args: list[str], repo) -> None:
    """Run a Slurm array job's tasks as concurrent processes, as ``sbatch --array=0-(count-1)`` would."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "SLURM_ARRAY_TASK_COUNT": str(count), "OMP_NUM_THREADS": "1"}
    tasks = [
        subprocess.Popen(
            ["bash", str(repo / "docs" / "cluster" / script), *args],
            cwd=repo,
            env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(count)
    ]
    for task in tasks:
        out, _ = task.communicate(timeout=600)
        assert task.returncode == 0, out


def test_the_slurm_recipes_run_as_array_tasks_giving_one_process_maps_and_every_sweep_row(trained_run, tmp_path, repo):
    from roar.core.tables import read_csv

    sets = [
        "attribution.methods=[gradient, random, ground_truth]",
        "retrain.methods=[random, ground_truth]",
        "retrain.thresholds=[50]",
        "retrain.training.epochs=1",
    ]
    single, _ = run_copy(trained_run, tmp_path, "single", sets)
    array, args = run_copy(trained_run, tmp_path, "array", sets)
    args = ["--config", "configs/smoke.yaml", *(x for s in args for x in ("--set", s))]
    extract.run(single)
    # the 256 test images are one batch: extracted in one process; the 1536 training images, 6 batches, by 2 tasks
    extract.run(array.model_copy(update={"attribution": array.attribution.model_copy(update={"splits": ["test"]})}))
    _array("extract.sbatch", 2, [*args, "--set", "attribution.splits=[train]"], repo)
    for split in ("train", "test"):
        with (
            MapStore.open(extract.store_path(single, split)) as a,
            MapStore.open(extract.store_path(array, split)) as b,
        ):
            assert all(a.digest(m) == b.digest(m) for m in a.methods) and a.methods == b.methods
    # The sweep's shards give one process's rows (tests/test_sweep.py): here, that the recipe runs them all, once.
    _array("retrain.sbatch", 2, [*args, "--mode", "roar"], repo)
    found = read_csv(array.run_dir / "retrain" / "results.csv")
    keys = sorted((r["mode"], r["method"], r["threshold"], r["seed"]) for r in found)
    assert keys == [
        ("baseline", "unmodified", "0", "0"),
        ("roar", "ground_truth", "50", "0"),
        ("roar", "random", "50", "0"),
    ]
