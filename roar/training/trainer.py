"""Training a classifier from a config: ``fit`` for any batch source, ``train`` for a run.

Deterministic on the CPU: every epoch draws its order and augmentation from a generator seeded
by (seed, epoch), so a run killed after epoch k and resumed from its checkpoint takes exactly
the same steps as one that was never interrupted. ROAR/KAR retraining reuses ``fit`` with
ablated sources, which is what "retrain with the base recipe" means.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from roar.atomic import write_text_atomic
from roar.config import RunConfig, TrainingConfig
from roar.data import Dataset, build_dataset
from roar.device import autocast, memory_format, resolve_device
from roar.errors import RoarError
from roar.models import Classifier, build_model
from roar.provenance import record_run, write_json
from roar.training.augment import random_crop_flip
from roar.training.checkpoint import load_checkpoint, save_atomic
from roar.training.sources import source_for

# ---------------------------------------------------------------- optimisation


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, steps_per_epoch: int):
    """A per-step schedule: epochs-based settings are converted to optimiser steps."""
    s, total = cfg.schedule, max(cfg.epochs * steps_per_epoch, 1)
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_epochs * steps_per_epoch, gamma=s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if s.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.optimizer.lr, total_steps=total, pct_start=s.warmup_fraction, anneal_strategy="linear"
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random stream of one epoch: data order and augmentation, independent of resumes."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


# ---------------------------------------------------------------- one epoch, evaluation


@torch.no_grad()
def evaluate(
    model: Classifier, source, batch_size: int, device: torch.device, amp: bool = True, channels_last: bool = True
):
    """Accuracy, mean loss and the predictions [N] (on the CPU, in index order) of ``source``."""
    model.eval()
    predictions = torch.empty(len(source), dtype=torch.int64)
    correct, loss_sum = 0, 0.0
    fmt = memory_format(device, channels_last)
    for images, labels, idx in source.batches(batch_size):
        with autocast(device, amp):
            logits = model(images.contiguous(memory_format=fmt)).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        pred = logits.argmax(1)
        correct += (pred == labels).sum().item()
        predictions[idx] = pred.cpu()
    n = max(len(source), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n}, predictions


@dataclass
class Snapshots:
    """When to keep a copy of the weights (after listed epochs, every k steps) and where."""

    directory: Path
    epochs: set[int] | str
    every_steps: int | None

    def at_epoch(self, epoch: int) -> bool:
        return self.epochs == "all" or epoch in self.epochs

    def save(self, model: torch.nn.Module, epoch: float, step: int, tag: str) -> None:
        save_atomic({"model": model.state_dict(), "epoch": epoch, "step": step}, self.directory / f"{tag}.pt")


def train_one_epoch(
    model,
    source,
    optimizer,
    scheduler,
    cfg: TrainingConfig,
    generator,
    device,
    step: int,
    snapshots=None,
    epoch: int = 0,
):
    model.train()
    fmt = memory_format(device, cfg.channels_last)
    loss_sum, correct, seen = 0.0, 0, 0
    lr = optimizer.param_groups[0]["lr"]
    steps_per_epoch = math.ceil(len(source) / cfg.batch_size)
    for i, (images, labels, _) in enumerate(source.batches(cfg.batch_size, generator, drop_last=True)):
        images = random_crop_flip(images, cfg.augment.crop_padding, cfg.augment.flip, generator)[0]
        with autocast(device, cfg.amp):
            logits = model(images.contiguous(memory_format=fmt))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used, before the schedule moves on
        scheduler.step()
        step += 1
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        if snapshots is not None and snapshots.every_steps and step % snapshots.every_steps == 0:
            snapshots.save(model, epoch - 1 + (i + 1) / steps_per_epoch, step, f"step_{step:07d}")
    if not math.isfinite(loss_sum):
        raise RoarError(f"training diverged in epoch {epoch} (loss is not finite): lower training.optimizer.lr")
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1), "lr": lr}, step


# ---------------------------------------------------------------- a whole training run


def fit(
    model: Classifier,
    train_source,
    test_source,
    cfg: TrainingConfig,
    out_dir: Path,
    seed: int,
    device: torch.device,
    desc: str = "train",
    fingerprint: dict | None = None,
):
    """Train ``model`` on ``train_source`` for ``cfg.epochs``, resuming from ``out_dir/last.pt``.

    Writes ``metrics.jsonl`` (one line per epoch), ``last.pt`` (every epoch, atomic),
    ``model.pt`` and ``summary.json`` at the end, and snapshots under ``snapshots/``.
    ``fingerprint`` identifies what is being trained; a checkpoint made for anything else is
    refused rather than silently continued.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = fingerprint or {}
    model.to(device=device, memory_format=memory_format(device, cfg.channels_last))
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = max(len(train_source) // cfg.batch_size, 1) if len(train_source) > cfg.batch_size else 1
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    snapshots = Snapshots(
        out_dir / "snapshots",
        cfg.snapshots.epochs if cfg.snapshots.epochs == "all" else set(cfg.snapshots.epochs),
        cfg.snapshots.every_steps,
    )

    start_epoch, step, elapsed = 0, 0, 0.0
    last = out_dir / "last.pt"
    if last.exists():
        state = load_checkpoint(last, device)
        if state.get("fingerprint") != fingerprint:
            changed = sorted(
                k
                for k in set(fingerprint) | set(state.get("fingerprint", {}))
                if fingerprint.get(k) != state.get("fingerprint", {}).get(k)
            )
            raise RoarError(
                f"{last} was written by a different setup (differs in: {', '.join(changed) or 'unknown'}); "
                "choose another output_dir or rerun with --restart"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, elapsed = state["epoch"], state["step"], state["seconds"]
    _truncate_metrics(out_dir / "metrics.jsonl", start_epoch)

    bar = tqdm(
        range(start_epoch + 1, cfg.epochs + 1),
        desc=desc,
        initial=start_epoch,
        total=cfg.epochs,
        unit="epoch",
        disable=None,
        leave=False,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        train_metrics, step = train_one_epoch(
            model, train_source, optimizer, scheduler, cfg, epoch_generator(seed, epoch), device, step, snapshots, epoch
        )
        test_metrics, _ = evaluate(model, test_source, cfg.eval_batch_size, device, cfg.amp, cfg.channels_last)
        elapsed += time.perf_counter() - t0
        row = {
            "epoch": epoch,
            "step": step,
            **train_metrics,
            "test_loss": test_metrics["loss"],
            "test_accuracy": test_metrics["accuracy"],
            "seconds": round(elapsed, 2),
        }
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if snapshots.at_epoch(epoch):
            snapshots.save(model, epoch, step, f"epoch_{epoch:04d}")
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "step": step,
                "seconds": elapsed,
                "fingerprint": fingerprint,
            },
            last,
        )
        bar.set_postfix(loss=f"{train_metrics['train_loss']:.3f}", test_acc=f"{test_metrics['accuracy']:.3f}")
    bar.close()

    final, predictions = evaluate(model, test_source, cfg.eval_batch_size, device, cfg.amp, cfg.channels_last)
    summary = {
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "epochs": cfg.epochs,
        "steps": step,
        "seconds": round(elapsed, 2),
    }
    return summary, predictions


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Keep only the metric lines of epochs a resumed run will not redo (and no torn line)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epoch:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    write_text_atomic(path, "".join(line + "\n" for line in keep))


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


def train(cfg: RunConfig, restart: bool = False) -> dict:
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
        return {**json.loads(summary_path.read_text()), "skipped": True}
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
    return summary


def load_trained_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    """The classifier saved by ``roar train`` (``<run>/train/model.pt``) and its metadata."""
    from roar.models import MODELS

    state = load_checkpoint(path)
    if "state_dict" not in state or "meta" not in state:
        raise RoarError(f"{path} is not a model saved by 'roar train'")
    meta = state["meta"]
    model_cfg = MODELS.config_class(meta["model"]["name"]).model_validate(meta["model"])
    model = build_model(model_cfg, meta["num_classes"], tuple(meta["geometry"]), meta["mean"], meta["std"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), meta


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
