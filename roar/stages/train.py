"""``roar train``: the run's base classifier in ``<run>/train`` (``model.pt``, checkpoints, snapshots)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from roar.config import RunConfig
from roar.core.device import resolve_device
from roar.core.errors import RoarError
from roar.core.provenance import record_run, write_json
from roar.data import Dataset, build_dataset
from roar.models import Classifier, build_model
from roar.stages.result import StageResult
from roar.training.checkpoint import load_checkpoint, save_atomic
from roar.training.sources import source_for
from roar.training.trainer import fit, load_trained_model


def model_metadata(dataset: Dataset, cfg: RunConfig) -> dict:
    """What a checkpoint needs to rebuild its model and to be matched to data later."""
    return {
        "model": cfg.model.model_dump(mode="json"),
        "num_classes": dataset.num_classes,
        "class_names": dataset.class_names,
        "geometry": list(dataset.train.geometry),
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
    }


def run(cfg: RunConfig, restart: bool = False) -> StageResult:
    """``roar train``: the base classifier of a run, in ``<run>/train``; returns its summary."""
    out_dir = cfg.run_dir / "train"
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    dataset = build_dataset(cfg.dataset)
    meta = model_metadata(dataset, cfg)
    fingerprint = {
        "dataset": dataset.fingerprint(),
        "model": json.dumps(meta["model"], sort_keys=True),
        "training": json.dumps(
            cfg.training.model_dump(mode="json", exclude={"eval_batch_size", "num_workers"}), sort_keys=True
        ),
        "seed": cfg.seed,
    }
    if restart:
        for stale in [out_dir / "last.pt", out_dir / "summary.json", out_dir / "model.pt", out_dir / "metrics.jsonl"]:
            stale.unlink(missing_ok=True)
        for snap in (out_dir / "snapshots").glob("*.pt"):
            snap.unlink()
    summary_path = out_dir / "summary.json"
    last = out_dir / "last.pt"
    if summary_path.exists() and last.exists() and load_checkpoint(last).get("fingerprint") == fingerprint:
        return _result(cfg, {**json.loads(summary_path.read_text()), "skipped": True})
    record_run(out_dir, cfg, {"dataset": dataset.fingerprint()}, device)

    model = build_model(cfg.model, dataset.num_classes, dataset.train.geometry, dataset.mean, dataset.std)
    train_source = source_for(dataset.train, device, cfg.training.num_workers)
    test_source = source_for(dataset.test, device, cfg.training.num_workers)
    summary, predictions = fit(
        model, train_source, test_source, cfg.training, out_dir, cfg.seed, device, fingerprint=fingerprint
    )
    save_atomic({"state_dict": model.state_dict(), "meta": meta, "summary": summary}, out_dir / "model.pt")
    summary.update({"dataset": dataset.name, "model": cfg.model.name, "device": str(device)})
    write_json(summary_path, summary)
    return _result(cfg, summary)


def _result(cfg: RunConfig, s: dict) -> StageResult:
    verb = "already trained" if s.get("skipped") else "trained" if s["epochs"] else "evaluated (training.epochs: 0)"
    return StageResult(
        s,
        f"{verb} {s['model']} on {s['dataset']}: test accuracy {100 * s['test_accuracy']:.2f}% "
        f"after {s['epochs']} epochs ({s['seconds']:.0f} s) -> {cfg.run_dir / 'train'}",
    )


def load_run_model(cfg: RunConfig, dataset: Dataset, device) -> tuple[Classifier, dict, Path]:
    """The run's trained model (``<run>/train/model.pt``) on ``device``, its metadata and path,
    after checking that it was trained on ``dataset``."""
    path = cfg.run_dir / "train" / "model.pt"
    model, meta = load_trained_model(path, device)
    if meta["dataset_fingerprint"] != dataset.fingerprint():
        raise RoarError(
            f"{path} was trained on another dataset (fingerprint {meta['dataset_fingerprint']}, "
            f"this config's is {dataset.fingerprint()}); retrain or fix the dataset section"
        )
    return model, meta, path
