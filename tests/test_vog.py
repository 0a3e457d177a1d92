"""VoG: the score, its stages and normalisation, the gradient store and reader, the peer scores,
the analyses, and the ``roar vog`` stage on a tiny trained run."""

from __future__ import annotations

import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_copy
from torch import nn

from roar.cli import main
from roar.config import VogConfig
from roar.core.errors import RoarError
from roar.core.provenance import file_hash
from roar.data import build_dataset
from roar.stages.train import load_run_model
from roar.stages.vog.gradients import (
    METHOD,
    REDUCTION,
    TARGET,
    PeerPlan,
    _Writes,
    compute_split,
    find_snapshots,
    gradient_path,
    load_snapshot,
    open_gradients,
)
from roar.stages.vog.stage import el2n_position, resolve_stages, run
from roar.store import StoreWriter
from roar.training.checkpoint import save_atomic
from roar.vog.analysis import auroc_table, decile_bins, decile_table
from roar.vog.peers import PeerCache, data_map, forgetting_events, grand_norms, peer_scores, snapshot_peers
from roar.vog.scores import class_normalize, default_stages, vog_scores


def numpy_vog(g: np.ndarray) -> np.ndarray:
    """The definition, on a whole [K, N, H, W] array: population std over K, mean over pixels."""
    g = np.asarray(g, dtype=np.float64)
    return g.std(axis=0).reshape(g.shape[1], -1).mean(axis=1)


# ------------------------------------------------------------------------------------------ the score


def test_identical_gradients_across_snapshots_give_zero_vog():
    one = np.random.default_rng(0).standard_normal((1, 5, 4, 4))
    g = np.repeat(one, 7, axis=0)
    assert np.allclose(vog_scores(g), 0.0, atol=1e-12)
    assert not np.allclose(vog_scores(g + np.arange(7).reshape(7, 1, 1, 1)), 0.0)


def test_two_snapshot_example_worked_out_by_hand():
    # Example 0: S1 = [[1, 2], [3, 4]], S2 = [[3, 2], [-1, 8]]. With two values the population std
    # is |a - b| / 2: pixels 2/2 = 1, 0/2 = 0, 4/2 = 2, 4/2 = 2, whose mean is 5/4 = 1.25.
    # Example 1: S1 = 0 everywhere, S2 = 2 everywhere: std 1 at every pixel, VoG 1.
    s1 = np.array([[[1, 2], [3, 4]], [[0, 0], [0, 0]]], dtype=np.float32)
    s2 = np.array([[[3, 2], [-1, 8]], [[2, 2], [2, 2]]], dtype=np.float32)
    assert np.allclose(vog_scores(np.stack([s1, s2])), [1.25, 1.0])


def test_stage_scores_use_only_the_stage_snapshots():
    # Six snapshots: early = 0, 1 (identical gradients), middle = 2, 3, late = 4, 5.
    rng = np.random.default_rng(1)
    base = rng.standard_normal((3, 4, 4))
    g = np.stack([base, base, base + 5, base - 5, base + 1, base - 1])
    stages = default_stages(6)
    assert stages == {"early": [0, 1], "middle": [2, 3], "late": [4, 5], "complete": [0, 1, 2, 3, 4, 5]}
    early = vog_scores(g, stages["early"])
    late = vog_scores(g, stages["late"])
    assert np.allclose(early, 0.0, atol=1e-12)
    assert np.allclose(late, 1.0)  # +1 and -1 around the same base: std 1 at every pixel
    assert np.allclose(vog_scores(g, stages["middle"]), 5.0)
    # The seed's toy summed all epochs' deviations and divided by the stage length: its early score is not 0.
    mean_all = g.mean(axis=0)
    buggy_early = (np.sqrt(((g - mean_all) ** 2).sum(axis=0) / len(stages["early"]))).reshape(3, -1).mean(axis=1)
    assert (buggy_early > 1).all()
    assert np.allclose(vog_scores(g), numpy_vog(g))


def test_class_normalisation_gives_mean_zero_and_std_one_per_class():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=400)
    scores = rng.gamma(2.0, size=400) * (labels + 1)  # classes of very different scale
    scores[labels == 3] = 7.0  # a class whose scores are all equal
    z = class_normalize(scores, labels)
    for c in range(3):
        assert abs(z[labels == c].mean()) < 1e-9
        assert abs(z[labels == c].std() - 1.0) < 1e-9
    assert np.all(z[labels == 3] == 0)
    # Within a class the order is unchanged.
    sel = labels == 1
    assert np.array_equal(np.argsort(z[sel], kind="stable"), np.argsort(scores[sel], kind="stable"))


def test_deciles_put_every_example_in_exactly_one_bin_and_break_ties_by_index():
    rng = np.random.default_rng(3)
    n = 1003
    scores = rng.integers(0, 20, size=n).astype(float)  # many ties
    index = rng.permutation(n)
    bins = decile_bins(scores, index)
    counts = np.bincount(bins, minlength=10)
    assert counts.sum() == n and len(counts) == 10 and counts.max() - counts.min() <= 1
    order = np.lexsort((index, scores))
    assert (np.diff(bins[order]) >= 0).all(), "bins follow the (score, index) order"
    correct = rng.random(n) < 0.8
    table = decile_table({"vog": scores}, correct, index)
    assert sum(r["examples"] for r in table) == n
    assert sum(r["errors"] for r in table) == int((~correct).sum())


def test_auroc_table_matches_sklearn_and_flips_confidence():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    tags = rng.integers(0, 4, size=300)
    score = rng.random(300) + 0.5 * (tags != 0)
    rows = auroc_table({("vog", "complete"): score, ("confidence", ""): -score}, tags, ["clean", "a", "b", "c"], "test")
    assert rows[0]["auroc"] == pytest.approx(roc_auc_score(tags != 0, score))
    assert rows[1]["score"] == "low_confidence" and rows[1]["auroc"] == pytest.approx(rows[0]["auroc"])
    sel = (tags == 0) | (tags == 2)
    assert rows[0]["b"] == pytest.approx(roc_auc_score(tags[sel] == 2, score[sel]))


# ---------------------------------------------------------------------------------------------- peers


def test_forgetting_events_and_data_map_on_a_hand_made_example():
    correct = np.array(
        [
            # ex0 ex1 ex2 ex3
            [1, 0, 1, 0],
            [0, 1, 1, 0],
            [1, 1, 1, 0],
            [0, 1, 0, 0],
        ],
        dtype=bool,
    )
    # ex0: 1→0 twice; ex1: learned, never forgotten; ex2: forgotten once at the end; ex3: never learned → K = 4.
    assert forgetting_events(correct).tolist() == [2, 0, 1, 4]
    p = np.array([[0.2, 0.5], [0.4, 0.5], [0.6, 0.5], [0.8, 0.5]])
    confidence, variability = data_map(p)
    # ex0: mean 0.5; deviations ±0.3, ±0.1 → population variance (0.09 + 0.01 + 0.01 + 0.09) / 4 = 0.05.
    assert np.allclose(confidence, [0.5, 0.5]) and np.allclose(variability, [np.sqrt(0.05), 0.0])
    scores = peer_scores({"p_true": p, "correct": correct[:, :2], "el2n": np.arange(8.0).reshape(4, 2)}, el2n_at=2)
    assert scores["el2n"].tolist() == [4.0, 5.0]


def test_snapshot_peers_from_logits_by_hand():
    # Logits (ln 3, 0): softmax (0.75, 0.25). With label 1: p_y = 0.25, wrong,
    # EL2N = ‖(0.75, 0.25) − (0, 1)‖ = ‖(0.75, −0.75)‖ = 0.75·√2. With label 0: p_y = 0.75, right, EL2N 0.25·√2.
    logits = torch.tensor([[np.log(3.0), 0.0], [np.log(3.0), 0.0]])
    out = snapshot_peers(logits, torch.tensor([1, 0]))
    assert np.allclose(out["p_true"], [0.25, 0.75])
    assert out["correct"].tolist() == [False, True]
    assert np.allclose(out["el2n"], [0.75 * np.sqrt(2), 0.25 * np.sqrt(2)], atol=1e-6)


def test_grand_equals_a_loop_of_per_example_weight_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model.eval()
    images, labels = torch.rand(6, 3, 8, 8), torch.randint(0, 5, (6,))
    expected = []
    for x, y in zip(images, labels):
        loss = F.cross_entropy(model(x[None]), y[None])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        expected.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)).item())
    assert np.allclose(grand_norms(model, images, labels, chunk=4), expected, rtol=1e-4)


# ----------------------------------------------------------------------------------- store and reader


def test_gradient_reader_streams_the_same_vog_as_numpy_on_the_whole_array(tmp_path):
    rng = np.random.default_rng(5)
    n, k, size = 150, 3, 6
    maps = rng.standard_normal((k, n, size, size)).astype(np.float32) * np.array([1e-6, 1.0, 30.0]).reshape(k, 1, 1, 1)
    names = {"epoch_0003": 2, "epoch_0001": 0, "epoch_0002": 1}  # written out of training order
    labels = rng.integers(0, 3, size=n)
    writer = StoreWriter(
        tmp_path / "test.h5",
        split="test",
        n=n,
        geometry=(3, size, size),
        dataset="toy",
        dataset_fingerprint="f",
        model_hash="m",
        identity={"reduction": REDUCTION, "target": TARGET},
        channels=False,
        methods={
            name: {"method": METHOD, "params": {"epoch": t + 1, "step": 10 * (t + 1)}} for name, t in names.items()
        },
        provenance={},
    )
    with writer:
        rows = writer.chunk_rows()
        for a in range(0, n, rows):
            b = min(n, a + rows)
            writer.write(
                a, {name: maps[t, a:b] for name, t in names.items()}, labels[a:b], labels[a:b], np.arange(a, b)
            )
        writer.finish()
    with open_gradients(tmp_path / "test.h5") as g:
        assert g.shape == (k, n, size, size) and g.snapshots == ["epoch_0001", "epoch_0002", "epoch_0003"]
        assert g[1, 10:20].shape == (10, size, size) and g[1, 10:20].dtype == np.float32
        full = np.asarray(g)
        streamed = vog_scores(g, budget_bytes=4096)  # a few examples per block
        assert np.allclose(streamed, numpy_vog(full), rtol=1e-12, atol=0)
        # Against the float32 maps written: float16 with a per-map scale loses at most 2^-11 of a map's max.
        assert np.allclose(full, maps, rtol=0, atol=float(np.abs(maps).max()) * 2**-11)
        assert np.allclose(streamed, numpy_vog(maps), rtol=2e-3)
        assert np.allclose(vog_scores(g, [0, 1]), numpy_vog(full[:2]), rtol=1e-12)


def test_a_store_of_attribution_maps_is_not_read_as_gradients(tmp_path):
    writer = StoreWriter(
        tmp_path / "maps.h5",
        split="test",
        n=4,
        geometry=(3, 4, 4),
        dataset="toy",
        dataset_fingerprint="f",
        model_hash="m",
        identity={"reduction": "sum_squares", "target": "predicted"},
        channels=False,
        methods={"gradient": {"method": "gradient", "params": {}}},
        provenance={},
    )
    with writer:
        labels = np.zeros(4, dtype=np.int64)
        writer.write(0, {"gradient": np.ones((4, 4, 4), np.float32)}, labels, labels, np.arange(4))
        writer.finish()
    with pytest.raises(RoarError, match="is not a VoG gradient store"):
        open_gradients(tmp_path / "maps.h5")


def test_the_peer_cache_resumes_by_chunk_and_recomputes_scores_of_other_snapshots(tmp_path):
    folder = tmp_path / "peers"
    identity = {"snapshots": "abc", "dataset_fingerprint": "f", "n": 10}
    cache = PeerCache(folder, identity, n=10, chunk_rows=4)
    assert not folder.exists()  # constructing a cache writes nothing
    assert cache.refresh() is None
    assert json.loads((folder / "identity.json").read_text()) == identity
    keys = ("p_true",)
    assert cache.pending("epoch_0001", keys) == {0, 4, 8}
    cache.save("epoch_0001", 4, {"p_true": np.arange(4, dtype=np.float32)})
    assert cache.pending("epoch_0001", keys) == {0, 8}
    assert not cache.finish("epoch_0001", keys)
    cache.save("epoch_0001", 0, {"p_true": np.zeros(4, np.float32)})
    cache.save("epoch_0001", 8, {"p_true": np.ones(2, np.float32)})
    assert cache.finish("epoch_0001", keys)
    assert cache.load("epoch_0001", keys)["p_true"].tolist() == [0] * 4 + [0, 1, 2, 3] + [1, 1]
    again = PeerCache(folder, identity, n=10, chunk_rows=4)
    assert again.refresh() is None and again.pending("epoch_0001", keys) == set()
    cache.save("epoch_0002", 0, {"p_true": np.zeros(4, np.float32)})  # a snapshot begun

    # Other snapshots: the arrays are discarded (never refused, never mixed in) and the new identity recorded.
    other = PeerCache(folder, {**identity, "snapshots": "xyz"}, n=10, chunk_rows=4)
    assert other.change() == "snapshots changed" and (folder / "epoch_0001.npz").exists()  # change() only reads
    assert other.refresh() == "snapshots changed"
    assert sorted(p.name for p in folder.iterdir()) == ["identity.json"]
    assert json.loads((folder / "identity.json").read_text())["snapshots"] == "xyz"
    assert other.pending("epoch_0001", keys) == {0, 4, 8} and other.refresh() is None
    other.save("epoch_0001", 0, {"p_true": np.zeros(4, np.float32)})
    moved = PeerCache(folder, {**identity, "snapshots": "xyz", "dataset_fingerprint": "g"}, n=10, chunk_rows=4)
    assert moved.refresh() == "data changed" and moved.pending("epoch_0001", keys) == {0, 4, 8}

    # Arrays without a record of their inputs are recomputed; a record of the earlier layout is honoured.
    bare = tmp_path / "bare"
    PeerCache(bare, identity, n=10, chunk_rows=4).save("epoch_0001", 0, {"p_true": np.zeros(4, np.float32)})
    assert PeerCache(bare, identity, n=10, chunk_rows=4).refresh() == "its inputs were not recorded"
    assert not (bare / "epoch_0001").exists()
    legacy = tmp_path / "legacy"
    PeerCache(legacy, identity, n=10, chunk_rows=4).save("epoch_0001", 0, {"p_true": np.zeros(4, np.float32)})
    (legacy / "settings.json").write_text(json.dumps(identity))
    kept = PeerCache(legacy, identity, n=10, chunk_rows=4)
    assert kept.refresh() is None and kept.pending("epoch_0001", keys) == {4, 8}
    assert sorted(p.name for p in legacy.iterdir()) == ["epoch_0001", "identity.json"]


def test_a_snapshot_whose_chunks_are_all_saved_is_gathered_and_a_leftover_chunk_folder_removed(tmp_path):
    cache = PeerCache(tmp_path / "peers", {"snapshots": "abc"}, n=6, chunk_rows=4)
    cache.refresh()
    keys = ("p_true",)
    cache.save("epoch_0001", 0, {"p_true": np.arange(6, dtype=np.float32)})  # both chunks, not gathered
    assert cache.pending("epoch_0001", keys) == set() and cache.load("epoch_0001", keys) is None
    assert cache.finish("epoch_0001", keys)
    assert cache.load("epoch_0001", keys)["p_true"].tolist() == list(range(6))
    assert not (tmp_path / "peers" / "epoch_0001").exists()
    cache.save("epoch_0001", 0, {"p_true": np.arange(6, dtype=np.float32)})  # a kill after gathering
    assert cache.finish("epoch_0001", keys) and not (tmp_path / "peers" / "epoch_0001").exists()


@pytest.mark.parametrize("background", [False, True])
def test_writes_keep_their_order_and_report_errors(background):
    done: list[int] = []
    writes = _Writes(background=background, depth=2)
    for i in range(20):
        writes.submit(done.append, i)
    writes.close()
    assert done == list(range(20))

    def fail() -> None:
        raise OSError("disk full")

    writes = _Writes(background=background)
    with pytest.raises(OSError, match="disk full"):
        writes.submit(fail)
        writes.close()


def _snapshot(path, state, epoch, step):
    save_atomic({"model": state, "epoch": epoch, "step": step}, path)


def test_snapshot_errors_are_one_line_and_say_what_to_do(tmp_path):
    folder = tmp_path / "snapshots"
    with pytest.raises(RoarError, match="training.snapshots"):
        find_snapshots(folder)
    model = nn.Linear(3, 2)
    _snapshot(folder / "epoch_0001.pt", model.state_dict(), 1, 5)
    with pytest.raises(RoarError, match="at least 2 training snapshots"):
        find_snapshots(folder)
    _snapshot(folder / "step_0000005.pt", model.state_dict(), 1.0, 5)  # the same step: the same weights
    with pytest.raises(RoarError, match="at least 2"):
        find_snapshots(folder)
    _snapshot(folder / "epoch_0002.pt", nn.Linear(3, 4).state_dict(), 2, 10)
    _snapshot(folder / "step_0000007.pt", model.state_dict(), 1.4, 7)
    found = find_snapshots(folder)
    assert [s.name for s in found] == ["epoch_0001", "step_0000007", "epoch_0002"]
    with pytest.raises(RoarError, match="does not fit") as info:
        load_snapshot(model, found[2], tmp_path / "model.pt")
    assert "\n" not in str(info.value) and "weight has shape [4, 3]" in str(info.value)
    assert file_hash(*[s.path for s in found]) != file_hash(*[s.path for s in found[:2]])


def test_stage_and_el2n_settings_are_checked_against_the_snapshots():
    assert resolve_stages({"a": [0, 1], "b": [3]}, 4) == {"a": [0, 1], "b": [3], "complete": [0, 1, 2, 3]}
    with pytest.raises(RoarError, match=r"vog.stages.b: positions \[4\]"):
        resolve_stages({"b": [4]}, 4)
    stages = default_stages(10)
    assert el2n_position(VogConfig(), stages, 10) == stages["early"][-1] == 2
    assert el2n_position(VogConfig(el2n_snapshot=-1), stages, 10) == 9
    with pytest.raises(RoarError, match="el2n_snapshot"):
        el2n_position(VogConfig(el2n_snapshot=10), stages, 10)


# ------------------------------------------------------------------------------------ the whole stage


@pytest.fixture(scope="module")
def vog_run(trained_run, tmp_path_factory):
    """``roar vog`` once on a copy of the tiny trained run (6 epoch snapshots); GraNd has its own test."""
    cfg, sets = run_copy(trained_run, tmp_path_factory.mktemp("vog"), "run", ["vog.grid_classes=2", "vog.grid_k=3"])
    summary = run(cfg)
    return cfg, sets, summary


def _rows(path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_vog_stage_writes_scores_tables_and_figures(vog_run):
    cfg, _, summary = vog_run
    out = cfg.run_dir / "vog"
    n = {"train": cfg.dataset.train_size, "test": cfg.dataset.test_size}
    assert summary["snapshots"] == 6 and summary["passes"] == 12
    rows = _rows(out / "scores.csv")
    assert list(rows[0]) == [
        *("index", "split", "label", "prediction", "correct", "stage", "vog", "vog_normalize", "vog_abs_normalize"),
        *("el2n", "forgetting", "confidence", "variability", "tag"),
    ]
    stages = ["early", "middle", "late", "complete"]
    assert len(rows) == len(stages) * (n["train"] + n["test"])
    for split in ("train", "test"):
        for stage in stages:
            got = sorted(int(r["index"]) for r in rows if r["split"] == split and r["stage"] == stage)
            assert got == list(range(n[split]))
    deciles = [r for r in _rows(out / "deciles.csv") if r["score"] == "vog"]
    assert sum(int(r["examples"]) for r in deciles) == n["test"]
    test_complete = [r for r in rows if r["split"] == "test" and r["stage"] == "complete"]
    errors = sum(r["correct"] == "0" for r in test_complete)
    assert sum(int(r["errors"]) for r in deciles) == errors
    assert summary["error_lowest_decile"] == pytest.approx(float(deciles[0]["error_rate"]))
    for name in ("deciles.md", "deciles.png", "auroc.csv", "auroc.md", "correlations.csv", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["disk.png", "ring.png"]
    assert (out / "config.yaml").exists() and (out / "provenance.json").exists()
    # class normalisation within the split, per stage
    for split in ("train", "test"):
        sel = [r for r in rows if r["split"] == split and r["stage"] == "late" and r["label"] == "0"]
        z = np.array([float(r["vog_normalize"]) for r in sel])
        assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    # the AUROC table covers every VoG variant and stage and each peer, per split
    auroc = _rows(out / "auroc.csv")
    assert len(auroc) == 2 * (3 * len(stages) + 5)  # el2n, forgetting, low_confidence, variability, final_error
    assert all(0 <= float(r["auroc"]) <= 1 for r in auroc)


def test_grand_goes_through_the_stage_at_the_el2n_snapshot(trained_run, tmp_path):
    """GraNd (per-example weight-gradient norms, costly) on the test split only: a column of
    positive scores equal to ``grand_norms`` of the EL2N snapshot's model."""
    cfg, _ = run_copy(trained_run, tmp_path, "grand", ["vog.splits=[test]", "vog.grand=true", "vog.grid_classes=0"])
    summary = run(cfg)
    rows = [r for r in _rows(cfg.run_dir / "vog" / "scores.csv") if r["stage"] == "complete"]
    rows.sort(key=lambda r: int(r["index"]))
    grand = np.array([float(r["grand"]) for r in rows])
    dataset = build_dataset(cfg.dataset)
    model, _, model_path = load_run_model(cfg, dataset, torch.device("cpu"))
    snapshot = next(
        s for s in find_snapshots(cfg.run_dir / "train" / "snapshots") if s.name == summary["el2n_snapshot"]
    )
    some = [0, 7, 200]
    images, labels = dataset.test.images[some].float() / 255, dataset.test.labels[some]
    expected = grand_norms(load_snapshot(model, snapshot, model_path)[0].eval(), images, labels)
    assert (grand > 0).all() and np.allclose(grand[some], expected, rtol=1e-3)


def test_stored_gradient_equals_autograd_of_the_true_class_logit(vog_run):
    cfg, _, _ = vog_run
    dataset = build_dataset(cfg.dataset)
    model, _, model_path = load_run_model(cfg, dataset, torch.device("cpu"))
    snapshots = find_snapshots(cfg.run_dir / "train" / "snapshots")
    rows = [3, 100]
    images = dataset.test.images[rows].float() / 255
    labels = dataset.test.labels[rows]
    with open_gradients(gradient_path(cfg, "test")) as g:
        assert g.snapshots == [s.name for s in snapshots]
        for k in (1, 4):
            snapshot_model, _ = load_snapshot(model, snapshots[k], model_path)  # not folded, as trained
            x = images.clone().requires_grad_(True)
            logit = snapshot_model.eval()(x).gather(1, labels.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(logit, x)
            expected = grad.mean(dim=1).numpy()
            for j, i in enumerate(rows):
                stored = g[k, i]
                assert np.allclose(stored, expected[j], rtol=0, atol=2e-3 * np.abs(expected[j]).max())
        assert not np.allclose(g[1, 3], g[4, 3])


def test_peer_scores_agree_with_the_snapshot_models(vog_run):
    cfg, _, summary = vog_run
    dataset = build_dataset(cfg.dataset)
    model, _, model_path = load_run_model(cfg, dataset, torch.device("cpu"))
    snapshots = find_snapshots(cfg.run_dir / "train" / "snapshots")
    images, labels = dataset.test.images.float() / 255, dataset.test.labels
    correct, p_true = [], []
    with torch.no_grad():
        for s in snapshots:
            probs = load_snapshot(model, s, model_path)[0].eval()(images).softmax(1)
            p_true.append(probs.gather(1, labels.view(-1, 1)).squeeze(1).numpy())
            correct.append((probs.argmax(1) == labels).numpy())
    confidence, variability = data_map(np.stack(p_true))
    forgetting = forgetting_events(np.stack(correct))
    rows = [r for r in _rows(cfg.run_dir / "vog" / "scores.csv") if r["split"] == "test" and r["stage"] == "early"]
    rows.sort(key=lambda r: int(r["index"]))
    assert np.allclose([float(r["confidence"]) for r in rows], confidence, atol=1e-4)
    assert np.allclose([float(r["variability"]) for r in rows], variability, atol=1e-4)
    assert (np.array([int(r["forgetting"]) for r in rows]) == forgetting).mean() > 0.99  # argmax near-ties may flip
    assert summary["el2n_snapshot"] == snapshots[1].name  # last of the early stage (snapshots 0, 1)


def test_rerun_computes_nothing_and_a_killed_extraction_resumes(vog_run, repo, tmp_path, capsys):
    cfg, sets, _ = vog_run
    store = gradient_path(cfg, "test")
    peers = cfg.run_dir / "vog" / "peers" / "test" / "epoch_0001.npz"
    stamps = (store.stat().st_mtime_ns, peers.stat().st_mtime_ns)
    smoke = str(repo / "configs" / "smoke.yaml")
    assert main(["vog", "--config", smoke, *[a for s in sets for a in ("--set", s)]]) == 0
    assert "(0 snapshot passes computed)" in capsys.readouterr().out
    assert (store.stat().st_mtime_ns, peers.stat().st_mtime_ns) == stamps

    # A run killed after two snapshot batches resumes with the rest and ends with the same gradients.
    shutil.copytree(cfg.run_dir / "train", tmp_path / "copy" / "train")
    other = cfg.model_copy(update={"output_dir": tmp_path / "copy"})
    dataset = build_dataset(other.dataset)
    model, _, model_path = load_run_model(other, dataset, torch.device("cpu"))
    snapshots = find_snapshots(other.run_dir / "train" / "snapshots")
    model_hash = file_hash(*[s.path for s in snapshots], model_path)
    calls = []

    def kill() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    args = (other, dataset, "test", snapshots, model, model_path, model_hash, torch.device("cpu"), PeerPlan(True))
    with pytest.raises(KeyboardInterrupt):
        compute_split(*args, on_batch=kill)
    assert not gradient_path(other, "test").exists()
    resumed = compute_split(*args)
    assert resumed["passes"] == resumed["snapshots"] - 2
    with open_gradients(gradient_path(other, "test")) as a, open_gradients(store) as b:
        assert np.allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
        assert np.array_equal(a.predictions, b.predictions)


def test_a_run_killed_during_the_peer_pass_resumes_to_the_scores_of_an_uninterrupted_run(
    vog_run, repo, tmp_path, capsys
):
    """``roar vog`` SIGKILLed while peer chunks of a snapshot are on disk (the snapshot not yet gathered):
    the rerun resumes and writes the same scores.csv as the uninterrupted run of ``vog_run``."""
    cfg, sets, _ = vog_run
    run_dir = tmp_path / "killed"
    shutil.copytree(cfg.run_dir / "train", run_dir / "train")
    sets = [s for s in sets if not s.startswith("output_dir=")] + [f"output_dir={run_dir}"]
    argv = ["vog", "--config", str(repo / "configs" / "smoke.yaml"), *[a for s in sets for a in ("--set", s)]]
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "roar", *argv], cwd=repo, stdout=log, stderr=subprocess.STDOUT)
    peers = run_dir / "vog" / "peers"
    seen, deadline = False, time.monotonic() + 900
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(peers.glob("*/*/*.npz")):  # chunks of a snapshot whose peer scores are not gathered yet
                seen = True
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait(timeout=120)
        log.close()
    assert seen, f"the run ended before any peer chunk was seen: {(tmp_path / 'killed.log').read_text()}"
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "vog" / "scores.csv").exists()

    assert main(argv) == 0
    assert "recomputed" not in capsys.readouterr().out  # what the killed run stored is resumed, not discarded
    assert (run_dir / "vog" / "scores.csv").read_bytes() == (cfg.run_dir / "vog" / "scores.csv").read_bytes()
    assert not list((run_dir / "vog").rglob(".*.tmp*"))  # what the killed writer left half-written is gone


def test_gradients_in_two_shards_merge_into_the_one_process_store_and_score_alike(vog_run, trained_run, tmp_path, repo):
    """``roar vog --shard i/2``: each shard's rows of every snapshot, stitched by the last shard into a
    store with the one-process digests; ``roar vog`` then scores from it exactly as from that store."""
    from roar.store import MapStore
    from roar.store.shards import shard_paths

    one, _, _ = vog_run
    cfg, sets = run_copy(trained_run, tmp_path, "sharded", ["vog.grid_classes=2", "vog.grid_k=3", "vog.splits=[train]"])
    with pytest.raises(RoarError, match="use at most 6 shards"):
        run(cfg, "0/7")  # 1536 rows are 6 whole batches
    assert not (cfg.run_dir / "vog").exists(), "a refused shard wrote something"
    first = run(cfg, "0/2")
    assert "waiting for the other shards" in first.summary() and first["shard"]["merged"] == []
    second = run(cfg, "1/2")
    assert "gradients merged; run 'roar vog'" in second.summary()
    (lo0, hi0), (lo1, hi1) = first["splits"][0]["rows"], second["splits"][0]["rows"]
    assert lo0 == 0 and hi0 == lo1 and hi1 == cfg.dataset.train_size
    path = gradient_path(cfg, "train")
    assert all(p.exists() for p in shard_paths(path, 2))
    path.unlink()  # by hand: roar merge --vog
    args = ["--config", str(repo / "configs" / "smoke.yaml"), *(x for s in sets for x in ("--set", s))]
    assert main(["merge", "--vog", "--shards", "2", *args]) == 0 and path.exists()
    with MapStore.open(path) as merged, MapStore.open(gradient_path(one, "train")) as single:
        assert merged.methods == single.methods and all(merged.digest(m) == single.digest(m) for m in single.methods)
        assert np.array_equal(merged.predictions, single.predictions)
    with pytest.raises(RoarError, match="shards write a new gradient store"):
        run(cfg, "0/2")
    before = file_hash(path)
    scored = run(cfg)  # the peers' forward passes only
    assert file_hash(path) == before and not scored["recomputed"], "the merged gradients are reused"

    def train_rows(run_cfg):
        return [r for r in _rows(run_cfg.run_dir / "vog" / "scores.csv") if r["split"] == "train"]

    assert train_rows(cfg) == train_rows(one)
