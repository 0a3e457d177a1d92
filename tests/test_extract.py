"""The extraction stage: stores for both splits, shared passes, SIGKILL-resume equality, refusals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import run_copy

from roar.attribution import create
from roar.attribution.engine import fold_batchnorm, prepare_model
from roar.config import load_config
from roar.core.errors import RoarError
from roar.data import build_dataset
from roar.stages.extract import run as extract
from roar.stages.extract import store_path
from roar.store import MapStore
from roar.training import load_trained_model

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def nan_method(model, images, targets):
    """A plug-in that breaks on the fifth image of the split."""
    out = torch.zeros(images.shape[0], 1, *images.shape[2:])
    return out.fill_(float("nan")) if images.shape[0] > 5 else out


def test_extract_writes_complete_stores_for_both_splits(trained_run, tmp_path):
    cfg, _ = run_copy(trained_run, tmp_path, "both")
    summary = extract(cfg)
    dataset = build_dataset(cfg.dataset)
    names = [e.name for e in cfg.attribution.entries()]
    for split in ("train", "test"):
        with MapStore.open(store_path(cfg, split)) as store:
            data = dataset.split(split)
            store.validate_for(
                dataset="shapes",
                split=split,
                n=len(data),
                geometry=data.geometry,
                dataset_fingerprint=data.fingerprint(),
            )
            assert store.methods == names
            np.testing.assert_array_equal(store.labels, data.labels.numpy())
            np.testing.assert_array_equal(store.read("ground_truth"), (data.masks == 1).float().numpy())
            assert (store.read("vargrad") >= 0).all()
    assert summary["methods"] == names
    # The stored gradient is the reduced gradient of the predicted class, to float16 precision.
    model, _ = load_trained_model(cfg.run_dir / "train" / "model.pt")
    images = dataset.test.images[:16].float() / 255
    model = prepare_model(model, torch.device("cpu"), probe=images)  # as the extraction prepares it
    expected = create("gradient")(model, images, model(images).argmax(1)).square().sum(1)
    with MapStore.open(store_path(cfg, "test")) as store:
        stored = torch.from_numpy(store.read("gradient", 0, 16))
    scale = expected.flatten(1).abs().amax(1).view(-1, 1, 1)
    assert ((stored - expected).abs() / scale).max() < 2e-3


def test_splits_may_name_the_methods_each_split_gets(trained_run, tmp_path):
    """``attribution.splits`` as a mapping: every method for test, only the listed ones for train."""
    overrides = [
        "attribution.methods=[gradient, random, ground_truth]",
        "attribution.splits={test: all, train: [ground_truth, random]}",
    ]
    cfg, _ = run_copy(trained_run, tmp_path, "per_split", overrides)
    summary = extract(cfg)
    assert [r["split"] for r in summary["splits"]] == ["test", "train"]
    with MapStore.open(store_path(cfg, "test")) as store:
        assert store.methods == ["gradient", "random", "ground_truth"]
    with MapStore.open(store_path(cfg, "train")) as store:
        assert store.methods == ["random", "ground_truth"]
    with pytest.raises(RoarError, match=r"attribution.splits.train: gradiant not among the methods.*'gradient'"):
        load_config(None, ["attribution.methods=[gradient]", "attribution.splits={train: [gradiant]}"])


def test_adding_a_method_computes_only_that_method(trained_run, tmp_path, monkeypatch):
    cfg, sets = run_copy(trained_run, tmp_path, "grow", ["attribution.methods=[gradient]", "attribution.splits=[test]"])
    extract(cfg)
    calls = []
    original = type(create("gradient")).compute_shared
    monkeypatch.setattr(
        type(create("gradient")), "compute_shared", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    grown = load_config(REPO / "configs" / "smoke.yaml", [*sets, "attribution.methods=[gradient, sobel]"])
    extract(grown)
    assert calls == []
    with MapStore.open(store_path(grown, "test")) as store:
        assert store.methods == ["gradient", "sobel"]


def test_maps_of_an_earlier_model_are_refused_by_the_stages_that_read_them(trained_run, tmp_path):
    """A retrained model makes the stored maps stale: curves and retraining refuse them, naming both models."""
    from roar.stages import curves
    from roar.stages.extract import open_maps, trained_model_hash
    from roar.stages.retrain import sweep

    cfg, _ = run_copy(trained_run, tmp_path, "stale", ["attribution.methods=[gradient]", "curves.max_images=8"])
    extract(cfg)
    dataset = build_dataset(cfg.dataset)
    before = trained_model_hash(cfg)
    with open_maps(cfg, dataset, "test") as store:
        assert store.attrs["model_hash"] == before
    model = cfg.run_dir / "train" / "model.pt"
    state = torch.load(model, weights_only=True)
    next(iter(state["state_dict"].values())).add_(1e-3)  # the model "retrained"
    torch.save(state, model)
    after = trained_model_hash(cfg)
    stale = rf"store was made with model {before[:12]}\.\.\., this run's model is {after[:12]}"
    with pytest.raises(RoarError, match=stale):
        curves.run(cfg)
    with pytest.raises(RoarError, match=stale):
        sweep.run(cfg, ["roar"])
    assert not (cfg.run_dir / "curves").exists() and not (cfg.run_dir / "retrain").exists(), "a refused run wrote"


def test_nan_maps_are_refused_naming_method_and_image(trained_run, tmp_path):
    method = "[{name: broken, method: tests.test_extract.nan_method}]"
    cfg, _ = run_copy(trained_run, tmp_path, "nan", [f"attribution.methods={method}", "attribution.splits=[test]"])
    with pytest.raises(RoarError, match="method 'broken' produced NaN at image index 0"):
        extract(cfg)
    with pytest.raises(RoarError, match="unfinished|no store"):
        MapStore.open(store_path(cfg, "test"))


def test_a_model_trained_on_other_data_is_refused(trained_run, tmp_path):
    cfg, _ = run_copy(trained_run, tmp_path, "other", ["dataset.seed=7"])
    with pytest.raises(RoarError, match="trained on another dataset"):
        extract(cfg)


def test_sigkill_then_resume_gives_the_maps_of_an_uninterrupted_run(trained_run, tmp_path):
    methods = "[gradient, {name: smoothgrad, samples: 2}, random]"
    extra = ["attribution.splits=[train]", "attribution.batch_size=256", f"attribution.methods={methods}"]
    killed_cfg, killed_sets = run_copy(trained_run, tmp_path, "killed", extra)
    straight_cfg, straight_sets = run_copy(trained_run, tmp_path, "straight", extra)

    def command(sets):
        args = [x for s in sets for x in ("--set", s)]
        return [sys.executable, "-m", "roar", "extract", "--config", "configs/smoke.yaml", *args]

    staging = store_path(killed_cfg, "train").with_name("train.h5.staging")
    proc = subprocess.Popen(command(killed_sets), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if staging.exists() and len(list(staging.rglob("*.npz"))) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not store_path(killed_cfg, "train").exists(), "the extraction finished before it could be killed"

    resumed = subprocess.run(command(killed_sets), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    extract(straight_cfg)
    with (
        MapStore.open(store_path(killed_cfg, "train")) as a,
        MapStore.open(store_path(straight_cfg, "train")) as b,
    ):
        assert a.methods == b.methods
        for method in a.methods:
            np.testing.assert_array_equal(a.read(method), b.read(method), err_msg=method)


def test_batchnorm_folding_keeps_the_function_and_the_layer_names(trained_run):
    model, _ = load_trained_model(trained_run.run_dir / "train" / "model.pt")
    images = build_dataset(trained_run.dataset).test.images[:32].float() / 255
    folded = fold_batchnorm(model, probe=images)
    assert folded is not model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert set(dict(folded.named_modules())) == set(dict(model.named_modules()))
    with torch.no_grad():
        torch.testing.assert_close(folded(images), model(images), rtol=1e-4, atol=1e-4)
    targets = model(images).argmax(1)
    a, b = create("gradient")(model, images, targets), create("gradient")(folded, images, targets)
    per_image = (a - b).flatten(1).abs().amax(1) / a.flatten(1).abs().amax(1)
    assert per_image.median() < 1e-5  # float rounding; a rare ReLU gate at exactly 0 may flip
