"""Training: augmentation keeps images and masks aligned, loss falls, runs are deterministic,
and a run killed with SIGKILL resumes to exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from roar.config import load_config
from roar.core.errors import RoarError
from roar.stages.train import run as train
from roar.training import load_trained_model
from roar.training.augment import random_crop_flip
from roar.training.checkpoint import load_checkpoint


def test_crop_without_padding_or_flip_is_the_identity():
    images = torch.rand(4, 3, 8, 8)
    (out,) = random_crop_flip(images, 0, False, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images)


def test_flip_mirrors_exactly_and_crop_shifts_with_zero_fill():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    (flipped,) = random_crop_flip(images.repeat(64, 1, 1, 1), 0, True, g)
    for out, src in zip(flipped, images.repeat(64, 1, 1, 1)):
        assert torch.equal(out, src) or torch.equal(out, src.flip(-1))
    (cropped,) = random_crop_flip(images.repeat(64, 1, 1, 1), 2, False, g)
    # Every crop is the source shifted by at most 2 pixels, with zeros where it left the image.
    for out, src in zip(cropped, images.repeat(64, 1, 1, 1)):
        padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
        windows = [padded[:, y : y + 4, x : x + 4] for y in range(5) for x in range(5)]
        assert any(torch.equal(out, w) for w in windows)


def test_aligned_tensors_get_the_same_crop_and_flip():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(32, 3, 16, 16)
    masks = images[:, 0] > 0.5  # a mask derived from the image must stay derived from it
    out_images, out_masks = random_crop_flip(images, 4, True, g, masks.float())
    inside = out_images[:, 0] != 0  # zero padding has no counterpart in the source mask test
    assert torch.equal((out_images[:, 0] > 0.5)[inside], out_masks.bool()[inside])


@pytest.fixture
def tiny_cfg(tiny_overrides):
    return load_config(None, [*tiny_overrides, "training.snapshots.epochs=all", "device=cpu", "training.num_workers=0"])


def test_training_writes_metrics_summary_provenance_and_snapshots(tiny_cfg):
    summary = train(tiny_cfg)
    run = tiny_cfg.run_dir / "train"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], "loss did not fall"
    saved = json.loads((run / "summary.json").read_text())
    assert {"test_accuracy", "epochs", "seconds"} <= set(saved) and saved["epochs"] == 3
    assert summary["test_accuracy"] == saved["test_accuracy"]
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["seed"] == 0 and provenance["roar_version"] and "dataset" in provenance["inputs"]
    assert load_config(run / "config.yaml") == tiny_cfg
    assert sorted(p.name for p in (run / "snapshots").glob("*.pt")) == [
        "epoch_0001.pt",
        "epoch_0002.pt",
        "epoch_0003.pt",
    ]
    model, meta = load_trained_model(run / "model.pt")
    assert meta["num_classes"] == 10 and meta["dataset_fingerprint"]
    # A finished run is not trained again.
    assert train(tiny_cfg).get("skipped") is True


FAST_WITH_AVERAGES = ["training.recipe=fast", "training.ema=0.9", "training.lookahead={every: 3}"]
"""The fast recipe (whitening init, label smoothing, onecycle) with both weight averages on."""


@pytest.mark.parametrize("recipe", [[], FAST_WITH_AVERAGES], ids=["default", "fast"])
def test_same_seed_same_weights_and_other_seed_other_weights(tiny_overrides, tmp_path, recipe):
    def weights(seed, out):
        overrides = [*recipe, *tiny_overrides, "training.epochs=1", f"seed={seed}", f"output_dir={out}"]
        cfg = load_config(None, overrides)
        train(cfg)
        return load_checkpoint(out / "train" / "model.pt")["state_dict"]

    a, b, c = weights(0, tmp_path / "a"), weights(0, tmp_path / "b"), weights(1, tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_step_snapshots(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "training.epochs=1", "training.snapshots.every_steps=1"])
    train(cfg)
    steps = sorted((cfg.run_dir / "train" / "snapshots").glob("step_*.pt"))
    assert len(steps) == 3  # 192 images, batch 64
    assert load_checkpoint(steps[0])["step"] == 1


def test_checkpoint_of_another_setup_is_refused(tiny_cfg, tiny_overrides):
    train(tiny_cfg)
    (tiny_cfg.run_dir / "train" / "summary.json").unlink()
    changed = load_config(None, [*tiny_overrides, "training.optimizer.lr=0.01"])
    with pytest.raises(RoarError, match="differs in: training"):
        train(changed)
    assert train(changed, restart=True)["epochs"] == 3


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tiny_overrides, tmp_path):
    args = [*FAST_WITH_AVERAGES, *tiny_overrides, "training.epochs=6", "dataset.train_size=384"]
    straight = tmp_path / "straight"
    killed = tmp_path / "killed"

    def command(out):
        sets = [x for a in [*args, f"output_dir={out}"] for x in ("--set", a)]
        return [sys.executable, "-m", "roar", "train", "--config", "configs/smoke.yaml", *sets]

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(command(killed), cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "train" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "train" / "summary.json").exists(), "the run finished before it could be killed"
    interrupted_at = load_checkpoint(last)["epoch"]
    assert 1 <= interrupted_at < 6

    resumed = subprocess.run(command(killed), cwd=repo, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    subprocess.run(command(straight), cwd=repo, check=True, capture_output=True)
    a = load_checkpoint(killed / "train" / "model.pt")["state_dict"]
    b = load_checkpoint(straight / "train" / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(x)["epoch"] for x in (killed / "train" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]


def test_zero_epochs_saves_the_model_as_built_for_evaluation_only(tiny_overrides, tmp_path):
    """training.epochs = 0: the model is used as it is (e.g. pretrained weights), evaluated and saved."""
    from roar.data import build_dataset
    from roar.models import build_model

    cfg = load_config(None, [*tiny_overrides, "training.epochs=0", "training.schedule={name: onecycle}"])
    summary = train(cfg)
    assert summary["epochs"] == 0 and 0 <= summary["test_accuracy"] <= 1
    dataset = build_dataset(cfg.dataset)
    torch.manual_seed(cfg.seed)
    built = build_model(cfg.model, dataset.num_classes, dataset.train.geometry, dataset.mean, dataset.std)
    saved = load_checkpoint(cfg.run_dir / "train" / "model.pt")["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in built.state_dict().items())


def test_roar_retraining_starts_from_scratch_even_with_pretrained_weights(tiny_overrides, monkeypatch):
    import roar.stages.retrain.sweep as sweep
    from roar.data import build_dataset

    cfg = load_config(None, [*tiny_overrides, "model={name: resnet50, weights: /nowhere/weights.pt}"])
    built = []

    def record(model_cfg, *args):
        built.append(model_cfg)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(sweep, "build_model", record)
    with pytest.raises(KeyboardInterrupt):
        sweep.retrain(cfg, build_dataset(cfg.dataset), sweep.Run("baseline", "unmodified", 0.0, 0), None, "cpu", {})
    assert built[0].name == "resnet50" and built[0].weights is None
    with pytest.raises(RoarError, match="retrain.training.epochs: set the retraining epochs"):
        zero = cfg.model_copy(
            update={
                "training": cfg.training.model_copy(update={"epochs": 0}),
                "retrain": cfg.retrain.model_copy(update={"training": "base"}),
            }
        )
        sweep.retrain(zero, build_dataset(cfg.dataset), sweep.Run("baseline", "unmodified", 0.0, 0), None, "cpu", {})
