"""The hardness predictor: its targets, its folds, that it learns, and that cross-fitting never scores
an image with a predictor that saw it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from roar.attribution.engine import prepare_model
from roar.attribution.gradcam import resolve_layer
from roar.data import build_dataset
from roar.insecurity.hardness import (
    HardnessPredictor,
    fit_predictor,
    fold_assignment,
    hardness_targets,
    predict_hardness,
)
from roar.stages.insecurity import hardness as stage_hardness
from roar.stages.train import load_run_model


def test_targets_are_one_minus_the_probability_of_the_true_class():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 1.0]])
    labels = torch.tensor([0, 2, 0])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    expected = 1 - p[np.arange(3), labels.numpy()]
    np.testing.assert_allclose(hardness_targets(logits, labels).numpy(), expected, rtol=1e-6)


def test_folds_are_balanced_seeded_and_cover_every_image():
    folds = fold_assignment(103, 5, seed=3)
    counts = np.bincount(folds.numpy(), minlength=5)
    assert counts.sum() == 103 and counts.max() - counts.min() <= 1
    assert torch.equal(folds, fold_assignment(103, 5, seed=3))
    assert not torch.equal(folds, fold_assignment(103, 5, seed=4))


def test_the_predictor_learns_a_hardness_that_lives_in_the_features():
    """Targets a known function of the features (the sigmoid of one channel's mean): held-out
    predictions follow them closely, and the same seed gives the same weights."""
    g = torch.Generator().manual_seed(0)
    features = torch.rand(600, 8, 4, 4, generator=g)
    targets = torch.sigmoid(6 * (features[:, 2].mean((1, 2)) - 0.5))
    model = fit_predictor(features[:500], targets[:500], hidden=16, epochs=80, lr=1e-2, seed=1)
    held = predict_hardness(model, features[500:])
    assert np.corrcoef(held.numpy(), targets[500:].numpy())[0, 1] > 0.9
    again = fit_predictor(features[:500], targets[:500], hidden=16, epochs=80, lr=1e-2, seed=1)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert isinstance(model, HardnessPredictor) and not model.training


@pytest.fixture(scope="module")
def prepared(trained_run):
    """(test split, prepared model, its last stage, a function giving the insecurity section with
    other hardness settings) of the small trained run."""
    cfg = trained_run
    dataset = build_dataset(cfg.dataset)
    split = dataset.test
    trained, _, _ = load_run_model(cfg, dataset, torch.device("cpu"))
    probe = split.images[:8].float() / 255
    model = prepare_model(trained, torch.device("cpu"), probe=probe)
    _, layer = resolve_layer(model, "auto", probe)

    def section(**hardness):
        return cfg.insecurity.model_copy(update={"hardness": cfg.insecurity.hardness.model_copy(update=hardness)})

    return split, model, layer, section


def test_cross_fitting_never_scores_an_image_with_a_predictor_that_saw_it(prepared, tmp_path, monkeypatch):
    split, model, layer, section = prepared
    ic = section(folds=3, epochs=2)
    seen: list[torch.Tensor] = []
    real_fit = stage_hardness.fit_predictor

    def recording_fit(features, targets, **kwargs):
        seen.append(features.flatten(1).clone())
        return real_fit(features, targets, **kwargs)

    monkeypatch.setattr(stage_hardness, "fit_predictor", recording_fit)
    inputs = {"model": "m", "dataset": "d", "split": "test", "layer": "l"}
    predictors = stage_hardness.ensure_predictors(tmp_path / "hp", ic, 0, model, split, layer, inputs, "cpu")
    assert len(seen) == 3 and len(predictors.heads) == 3
    features, _ = stage_hardness.features_and_logits(model, split, np.arange(len(split)), layer, "cpu", 64)
    flat = features.flatten(1)
    for row in range(len(split)):
        k = int(predictors.fold_of[row])
        assert not (seen[k] == flat[row]).all(1).any(), f"image {row} was in the training set of its own predictor"
    assert sum(len(s) for s in seen) == 2 * len(split)  # each image trains the two other folds' predictors
    report = predictors.report
    assert set(report["auroc_error"]) == {"cs", "entropy", "hp"} and report["images"] == len(split)

    seen.clear()
    reused = stage_hardness.ensure_predictors(tmp_path / "hp", ic, 0, model, split, layer, inputs, "cpu")
    assert seen == [] and reused.digest == predictors.digest and reused.note == ""
    changed = stage_hardness.ensure_predictors(
        tmp_path / "hp", ic, 0, model, split, layer, {**inputs, "model": "other"}, "cpu"
    )
    assert len(seen) == 3 and "settings changed: model" in changed.note


@pytest.mark.parametrize("bad", [b"", b"not a checkpoint"])
def test_an_unreadable_predictor_file_is_retrained(prepared, tmp_path, bad):
    split, model, layer, section = prepared
    ic = section(folds=2, epochs=1)
    inputs = {"model": "m", "dataset": "d", "split": "test", "layer": "l"}
    stage_hardness.ensure_predictors(tmp_path, ic, 0, model, split, layer, inputs, "cpu")
    (tmp_path / "fold_1.pt").write_bytes(bad)
    again = stage_hardness.ensure_predictors(tmp_path, ic, 0, model, split, layer, inputs, "cpu")
    assert "unreadable" in again.note
