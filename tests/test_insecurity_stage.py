"""``roar insecurity``: outputs, reuse and recomputation, kill -9 resume, refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from roar.core.errors import RoarError
from roar.core.tables import read_csv
from roar.data import build_dataset
from roar.insecurity.ambiguity import rank_pairs
from roar.stages.insecurity import stage
from roar.stages.insecurity.store import open_maps
from roar.store import MapStore, staging_path
from tests.conftest import REPO
from tests.helpers import run_copy


@pytest.fixture(scope="module")
def finished(trained_run, tmp_path_factory):
    """One finished insecurity run on the small trained model (all test images with a hard tag)."""
    cfg, sets = run_copy(trained_run, tmp_path_factory.mktemp("insecurity"), "run", ["insecurity.images=hard"])
    return cfg, sets, stage.run(cfg)


def test_outputs_tables_and_plots(finished):
    cfg, _, result = finished
    out = cfg.run_dir / "insecurity"
    for name in (
        "maps.h5",
        "results.csv",
        "areas.csv",
        "summary.md",
        "summary.json",
        "pr.png",
        "examples.png",
        "config.yaml",
        "provenance.json",
        "hardness/fold_0.pt",
        "hardness/fold_1.pt",
    ):
        assert (out / name).exists(), name
    areas = read_csv(out / "areas.csv")
    kinds = {(a["map"], a["score"], a["variant"]) for a in areas}
    for s in ("cs", "entropy", "hp"):
        for v in ("gradient", "ig", "2ndg"):
            assert ("insecurity", s, v) in kinds and ("difficulty", s, v) in kinds
    assert ("class_map", "", "gradient") in kinds and ("random", "", "ig") in kinds
    assert all(0 <= float(a["area"]) <= 1 for a in areas)
    text = (out / "summary.md").read_text()
    assert "| hp |" in text and "random map" in text and "strongest ambiguity" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == result["images"] > 0 and summary["best"] is not None
    assert result.summary().startswith("insecurity maps of")


def test_stored_maps_follow_the_layout(finished):
    """Slots of pairs that are no ambiguity are zero; every stored slot has maximum 1 or is all zero;
    the strongest pair's total is the largest among the image's ambiguities."""
    cfg, _, _ = finished
    split = build_dataset(cfg.dataset).test
    p = len(rank_pairs(cfg.insecurity.top))
    with open_maps(cfg.run_dir / "insecurity" / "maps.h5") as store:
        assert store.geometry == (p + 2, 8, 8)  # layer3 of ResNet8 at 32×32: the maps at the layer's resolution
        maps = store.read("hp.2ndg")
        pairs = store.extra("pairs.gradient")
        np.testing.assert_array_equal(store.labels, split.labels.numpy()[store.indices])
        assert (split.tags.numpy()[store.indices] > 0).all()
        assert np.all(maps[:, :p][~pairs] == 0)
        peaks = maps.reshape(*maps.shape[:2], -1).max(-1)
        assert np.all((np.abs(peaks - 1) < 1e-3) | (peaks == 0))
        totals = store.extra("totals.hp.2ndg")
        assert np.all(totals[~pairs] == 0) and np.all(totals >= 0)
        top = store.extra("top")
        assert np.all(top[:, 0] == store.predictions)


def test_rerun_reuses_everything_and_a_changed_setting_recomputes(finished, tmp_path):
    cfg, sets, _ = finished
    again = stage.run(cfg)
    assert again["maps_computed"] == 0 and again["recomputed"] == []
    changed = stage.run(cfg.model_copy(update={"insecurity": cfg.insecurity.model_copy(update={"ig_steps": 3})}))
    assert changed["maps_computed"] == changed["images"]
    assert any("ig_steps" in note for note in changed["recomputed"])
    hardness = stage.run(
        cfg.model_copy(
            update={
                "insecurity": cfg.insecurity.model_copy(
                    update={"hardness": cfg.insecurity.hardness.model_copy(update={"epochs": 4})}
                )
            }
        )
    )
    assert any("hardness predictor retrained" in note and "epochs" in note for note in hardness["recomputed"])
    assert hardness["maps_computed"] == hardness["images"]  # new predictors: new hp maps


def test_kill_then_resume_gives_the_maps_of_an_uninterrupted_run(trained_run, tmp_path):
    # maps at layer1 (32×32) fill a store chunk (the unit of resumption) with 21 images: 64 images are 4 chunks
    extra = [
        "insecurity.layer=layer1",
        "insecurity.images=all",
        "insecurity.max_images=64",
        "insecurity.scores=[cs, entropy]",  # the hardness predictors' own resumption: test_insecurity_hardness
        "insecurity.variants=[gradient]",
    ]
    killed_cfg, killed_sets = run_copy(trained_run, tmp_path, "killed", extra)
    straight_cfg, _ = run_copy(trained_run, tmp_path, "straight", extra)
    command = [sys.executable, "-m", "roar", "insecurity", "--config", "configs/smoke.yaml"]
    command += [x for s in killed_sets for x in ("--set", s)]
    path = killed_cfg.run_dir / "insecurity" / "maps.h5"
    staging = staging_path(path)
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if staging.exists() and len(list(staging.glob("maps/*/*.npz"))) >= 2:  # the first chunk of both sets
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not path.exists(), "the stage finished before it could be killed"
    with MapStore.open(path, require_complete=False) as partial:
        assert 0 < partial.method_info("entropy.gradient")["rows_done"] < partial.n
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "64 all images" in resumed.stdout
    stage.run(straight_cfg)
    with open_maps(path) as a, open_maps(straight_cfg.run_dir / "insecurity" / "maps.h5") as b:
        assert a.methods == b.methods
        for name in a.methods:
            np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)
        for name in a.extras:
            np.testing.assert_array_equal(a.extra(name), b.extra(name), err_msg=name)


def test_refusals_change_nothing(trained_run, tmp_path):
    cfg, _ = run_copy(trained_run, tmp_path, "bad", ["insecurity.layer=layer9"])
    with pytest.raises(RoarError, match="unknown layer 'layer9'"):
        stage.run(cfg)
    assert not (cfg.run_dir / "insecurity").exists()
    cfg, _ = run_copy(
        trained_run,
        tmp_path,
        "none",
        ["insecurity.images=two_objects", "insecurity.split=train", "dataset.hard_fraction=0"],
    )
    with pytest.raises(RoarError):
        stage.run(cfg)
    assert not (cfg.run_dir / "insecurity").exists()


def test_config_errors_name_the_key():
    from roar.config import load_config

    with pytest.raises(RoarError, match="insecurity.scroes"):
        load_config(REPO / "configs" / "smoke.yaml", ["insecurity.scroes=[cs]"])
    with pytest.raises(RoarError, match="per_location"):
        load_config(REPO / "configs" / "smoke.yaml", ["insecurity.per_location=6"])
    with pytest.raises(RoarError, match="insecurity.variants"):
        load_config(REPO / "configs" / "smoke.yaml", ["insecurity.variants=[gradient, gradient]"])


def test_datasets_without_pair_ground_truth_get_maps_but_no_evaluation(trained_run, tmp_path, monkeypatch):
    from roar.data.base import TensorSplit

    monkeypatch.setattr(TensorSplit, "pair_evidence", lambda self, index, a, b: None)
    cfg, _ = run_copy(
        trained_run,
        tmp_path,
        "nogt",
        ["insecurity.images=hard", "insecurity.scores=[cs]", "insecurity.variants=[gradient]"],
    )
    result = stage.run(cfg)
    out = cfg.run_dir / "insecurity"
    assert (out / "maps.h5").exists() and not (out / "results.csv").exists()
    assert "no ground truth" in (out / "summary.md").read_text()
    assert result["best"] is None
    assert torch.isfinite(torch.tensor(result["images"], dtype=torch.float32))
