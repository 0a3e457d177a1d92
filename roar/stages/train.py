"""``roar train``: the run's base classifier in ``<run>/train`` (``model.pt``, checkpoints, snapshots)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from roar.config import RunConfig
from roar.core.device import resolve_device
from roar.core.errors import RoarError
from roar.core.locks import output_folder
from roar.core.provenance import changed_keys, file_hash, flatten, record_run, write_json
from roar.data import Dataset, build_dataset
from roar.models import Classifier, build_model
from roar.stages.result import StageResult
from roar.training import distributed
from roar.training.checkpoint import check_resumable, load_checkpoint, save_atomic
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


def _training_fingerprint(cfg: RunConfig, dataset: Dataset, meta: dict) -> dict:
    """What a checkpoint of this run is trained for: resumed only while it matches."""
    return {
        "dataset": dataset.fingerprint(),
        "model": json.dumps(meta["model"], sort_keys=True),
        "training": json.dumps(
            cfg.training.model_dump(mode="json", exclude={"eval_batch_size", "num_workers"}), sort_keys=True
        ),
        "seed": cfg.seed,
    }


def _read_summary(path: Path) -> dict | None:
    """A finished run's summary, or None if missing or unreadable (then the run is finished again from
    its checkpoint, which costs nothing when every epoch is done)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "test_accuracy" in summary else None


def run(cfg: RunConfig, restart: bool = False) -> StageResult:
    """``roar train``: the base classifier of a run, in ``<run>/train``; returns its summary.

    Everything is checked before anything is written: a run refused because its config no longer
    matches the checkpoint leaves the folder as it was. Under torchrun every rank runs this; rank 0
    takes the folder's lock, decides (refuse, resume, skip) for all and alone writes.
    """
    out_dir = cfg.run_dir / "train"
    w, device = distributed.init(resolve_device(cfg.device))
    distributed.per_rank_batch(cfg.training.batch_size, w.size)
    torch.manual_seed(cfg.seed)
    dataset = distributed.main_first(lambda: build_dataset(cfg.dataset), w)  # rank 0 fills a cache, if any
    meta = model_metadata(dataset, cfg)
    fingerprint = _training_fingerprint(cfg, dataset, meta)
    model = build_model(cfg.model, dataset.num_classes, dataset.train.geometry, dataset.mean, dataset.std)
    with contextlib.ExitStack() as held:

        def begin() -> dict | None:
            """On rank 0: lock, restart, refuse or resume; the summary of a finished run (else None)."""
            held.enter_context(output_folder(out_dir))
            if restart:
                for stale in ["last.pt", "summary.json", "model.pt", "metrics.jsonl"]:
                    (out_dir / stale).unlink(missing_ok=True)
                for snap in (out_dir / "snapshots").glob("*.pt"):
                    snap.unlink()
            last = out_dir / "last.pt"
            state = load_checkpoint(last) if last.exists() else None
            check_resumable(state, fingerprint, last)
            summary = _read_summary(out_dir / "summary.json")
            if summary is not None and state is not None and (out_dir / "model.pt").exists():
                return summary
            record_run(out_dir, cfg, {"dataset": dataset.fingerprint()}, device, world_size=w.size)
            return None

        finished = distributed.on_main(begin, w)
        if finished is not None:
            return _result(cfg, {**finished, "skipped": True})
        train_source = source_for(dataset.train, device, cfg.training.num_workers)
        test_source = source_for(dataset.test, device, cfg.training.num_workers)
        summary, _ = fit(
            model, train_source, test_source, cfg.training, out_dir, cfg.seed, device, fingerprint=fingerprint, w=w
        )
        summary.update({"dataset": dataset.name, "model": cfg.model.name, "device": str(device)})
        if w.distributed:
            summary["processes"] = w.size

        def finish() -> None:
            save_atomic({"state_dict": model.state_dict(), "meta": meta, "summary": summary}, out_dir / "model.pt")
            write_json(out_dir / "summary.json", summary)

        distributed.on_main(finish, w)  # every rank returns once the model is on disk
    return _result(cfg, summary)


def _result(cfg: RunConfig, s: dict) -> StageResult:
    verb = "already trained" if s.get("skipped") else "trained" if s["epochs"] else "evaluated (training.epochs: 0)"
    return StageResult(
        s,
        f"{verb} {s['model']} on {s['dataset']}: test accuracy {100 * s['test_accuracy']:.2f}% "
        f"after {s['epochs']} epochs ({s['seconds']:.0f} s) -> {cfg.run_dir / 'train'}",
    )


def check_model_config(cfg: RunConfig, meta: dict, path: Path) -> None:
    """RoarError naming the first ``model.*`` key in which the config contradicts the trained model at
    ``path``: a stage must never use one model while its config (and provenance) describe another."""
    trained, asked = meta["model"], cfg.model.model_dump(mode="json")
    changed = changed_keys(trained, asked)
    if changed:
        key = changed[0]
        old, new = flatten(trained).get(key, "<unset>"), flatten(asked).get(key, "<unset>")
        raise RoarError(
            f"model.{key}: this config says {new!r}, but {path} was trained with {old!r}; "
            "set it back, or train a model for this config (another output_dir, or roar train --restart)"
        )


def check_run_model(cfg: RunConfig) -> str:
    """The hash of the run's trained model, after checking that the config's model section is the one
    it was trained with (for stages that read its maps but not its weights)."""
    path = cfg.run_dir / "train" / "model.pt"
    if not path.exists():
        raise RoarError(f"no trained model at {path}: run 'roar train' first")
    state = load_checkpoint(path)
    if "meta" not in state:
        raise RoarError(f"{path} is not a model saved by 'roar train'")
    check_model_config(cfg, state["meta"], path)
    return file_hash(path)


def load_run_model(cfg: RunConfig, dataset: Dataset, device) -> tuple[Classifier, dict, Path]:
    """The run's trained model (``<run>/train/model.pt``) on ``device``, its metadata and path,
    after checking that it was trained on ``dataset`` with the config's model section."""
    path = cfg.run_dir / "train" / "model.pt"
    model, meta = load_trained_model(path, device)
    check_model_config(cfg, meta, path)
    if meta["dataset_fingerprint"] != dataset.fingerprint():
        raise RoarError(
            f"{path} was trained on another dataset (fingerprint {meta['dataset_fingerprint']}, "
            f"this config's is {dataset.fingerprint()}); retrain or fix the dataset section"
        )
    return model, meta, path
