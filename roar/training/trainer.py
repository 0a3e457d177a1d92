"""Training a classifier: ``fit`` for any batch source (the ``roar train`` stage is ``roar.stages.train``).

Deterministic on the CPU: every epoch draws its order and augmentation from a generator seeded
by (seed, epoch), so a run killed after epoch k and resumed from its checkpoint takes exactly
the same steps as one that was never interrupted. ROAR/KAR retraining reuses ``fit`` with
ablated sources, which is what "retrain with the base recipe" means.

Under torchrun ``fit`` trains data-parallel (``roar.training.distributed``): ``batch_size`` stays
the global batch, every rank draws the epoch's order from the same generator and trains on its
own part of each global batch, DDP averages the gradients, and rank 0 alone writes the metrics,
checkpoints and snapshots. A single process takes exactly the steps it always took.
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

from roar.core.atomic import write_text_atomic
from roar.core.device import autocast, memory_format
from roar.core.errors import RoarError
from roar.models import Classifier, build_model
from roar.training import distributed
from roar.training.augment import flip_choices, random_crop_flip
from roar.training.averaging import Averages
from roar.training.checkpoint import check_resumable, load_checkpoint, save_atomic
from roar.training.config import TrainingConfig
from roar.training.distributed import SINGLE, World
from roar.training.whitening import whiten_first_conv

# ---------------------------------------------------------------- optimisation


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._NormBase | torch.nn.GroupNorm | torch.nn.LayerNorm)


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """The optimiser of ``cfg``; with ``bn_lr_scale`` != 1, normalisation weights and biases form a
    second parameter group with the scaled learning rate (the schedule scales both alike)."""
    o = cfg.optimizer
    norm = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.bn_lr_scale != 1 and norm:
        groups = [
            {"params": [p for p in params if id(p) not in norm]},
            {"params": [p for p in params if id(p) in norm], "lr": o.lr * cfg.bn_lr_scale},
        ]
    else:
        groups = [{"params": params}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, weight_decay=o.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, steps_per_epoch: int):
    """A per-step schedule: epochs-based settings are converted to optimiser steps."""
    s, total = cfg.schedule, max(cfg.epochs * steps_per_epoch, 1)
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_epochs * steps_per_epoch, gamma=s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if s.name == "onecycle":
        # OneCycleLR divides by (warm-up steps - 1): zero for a warm-up of exactly one step (a short run
        # on little data), so such a warm-up is made a hair longer; every other length is left alone.
        warmup = s.warmup_fraction if abs(s.warmup_fraction * total - 1) > 1e-9 else (1 + 1e-6) / total
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total,
            pct_start=warmup,
            anneal_strategy="linear",
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random stream of one epoch: data order and augmentation, independent of resumes."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def augment_generator(seed: int, epoch: int, w: World) -> torch.Generator | None:
    """The augmentation stream of rank ``w.rank`` of a data-parallel run (None for one process, whose
    augmentation continues the epoch's stream): the ranks share the order's stream, and would
    otherwise crop and flip their different images with identical draws."""
    if not w.distributed:
        return None
    return torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_009 + w.rank + 1)


# ---------------------------------------------------------------- one epoch, evaluation


@torch.no_grad()
def evaluate(
    model: Classifier,
    source,
    batch_size: int,
    device: torch.device,
    amp: bool = True,
    channels_last: bool = True,
    tta: str = "none",
    w: World = SINGLE,
):
    """Accuracy, mean loss and the predictions [N] (on the CPU, in index order) of ``source``.

    ``tta="flip"`` averages the logits of each image and its mirror image. With several ranks each
    evaluates its contiguous part and the counts and predictions are summed, identical on every rank.
    """
    model.eval()
    predictions = torch.zeros(len(source), dtype=torch.int64)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    fmt = memory_format(device, channels_last)
    part = {"shard": lambda order: distributed.split(order, w.rank, w.size)} if w.distributed else {}
    for images, labels, idx in source.batches(batch_size, **part):
        with autocast(device, amp):
            logits = model(images.contiguous(memory_format=fmt)).float()
            if tta == "flip":
                logits = (logits + model(images.flip(-1).contiguous(memory_format=fmt)).float()) / 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        pred = logits.argmax(1)
        correct += (pred == labels).sum()
        predictions[idx] = pred.cpu()
    if w.distributed:  # each index was predicted by one rank, zero elsewhere
        correct, loss_sum = distributed.sum_over_ranks(correct, w), distributed.sum_over_ranks(loss_sum, w)
        predictions = distributed.sum_over_ranks(predictions, w)
    n = max(len(source), 1)
    return {"accuracy": correct.item() / n, "loss": loss_sum.item() / n}, predictions


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
    averages: Averages | None = None,
    flips: torch.Tensor | None = None,
    w: World = SINGLE,
    step_model: torch.nn.Module | None = None,
    augment: torch.Generator | None = None,
):
    """One pass over ``source``. ``flips`` (bool [N], with ``augment.flip: alternating``) flips each
    example on odd epochs and its complement on even ones.

    Data-parallel (``w``): ``step_model`` is ``model`` in DDP, this rank trains on its part of each
    global batch of ``cfg.batch_size`` and crops with its own ``augment`` stream; the loss and
    accuracy returned are those of the global batches, the same on every rank.
    """
    model.train()
    fmt = memory_format(device, cfg.channels_last)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64)
    lr = optimizer.param_groups[0]["lr"]
    steps_per_epoch = math.ceil(len(source) / cfg.batch_size)
    batch = distributed.per_rank_batch(cfg.batch_size, w.size)
    part = {"shard": lambda order: distributed.shard(order, batch, w.rank, w.size)} if w.distributed else {}
    step_model = step_model or model
    augment = augment or generator
    for i, (images, labels, idx) in enumerate(source.batches(batch, generator, drop_last=True, **part)):
        flip = cfg.augment.flip is True
        if cfg.augment.flip == "alternating":
            flip = (flips[idx] ^ (epoch % 2 == 0)).to(images.device)
        images = random_crop_flip(images, cfg.augment.crop_padding, flip, augment)[0]
        with autocast(device, cfg.amp):
            logits = step_model(images.contiguous(memory_format=fmt))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if averages is not None:
            averages.update(model)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used, before the schedule moves on
        scheduler.step()
        step += 1
        loss_sum += loss.detach() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if snapshots is not None and snapshots.every_steps and step % snapshots.every_steps == 0:
            kept = averages.evaluated(model) if averages is not None else model  # as the epoch snapshots
            snapshots.save(kept, epoch - 1 + (i + 1) / steps_per_epoch, step, f"step_{step:07d}")
    if w.distributed:  # one collective per epoch: the global batches' loss and accuracy
        loss_sum, correct = distributed.sum_over_ranks(loss_sum, w), distributed.sum_over_ranks(correct, w)
        seen = distributed.sum_over_ranks(seen, w)
    seen = int(seen)
    loss_sum = loss_sum.item()
    if not math.isfinite(loss_sum):
        raise RoarError(f"training diverged in epoch {epoch} (loss is not finite): lower training.optimizer.lr")
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct.item() / max(seen, 1), "lr": lr}, step


WHITEN_IMAGES = 1024
"""Training images whose patches set the whitening filters: about a million 3×3 patches at 32×32,
plenty for a covariance of 27 dimensions, and a fraction of a second."""


def prepare(model: Classifier, source, cfg: TrainingConfig, seed: int) -> None:
    """What a recipe does to a freshly built model before its first step: BatchNorm momentum and the
    whitening initialisation of the first convolution (from ``WHITEN_IMAGES`` training images, drawn
    with a generator of their own so the epochs' random streams are untouched)."""
    if cfg.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum
    if cfg.whiten_init:
        images = next(iter(source.batches(min(len(source), WHITEN_IMAGES), torch.Generator().manual_seed(seed))))[0]
        whiten_first_conv(model.net, (images - model.mean.view(1, -1, 1, 1)) / model.std.view(1, -1, 1, 1))


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
    w: World = SINGLE,
):
    """Train ``model`` on ``train_source`` for ``cfg.epochs``, resuming from ``out_dir/last.pt``.

    Writes ``metrics.jsonl`` (one line per epoch: train loss and accuracy, test loss and accuracy
    every ``eval_every`` epochs, cumulative ``train_seconds`` without evaluation and ``seconds`` with
    it), ``last.pt`` (every epoch, atomic), and snapshots under ``snapshots/``. ``fingerprint``
    identifies what is being trained; a checkpoint made for anything else is refused rather than
    silently continued. With ``cfg.ema`` the averaged weights are copied into ``model`` at the end:
    the returned model is the one evaluated.

    With several ranks (``w``, from ``distributed.init``) every rank calls ``fit`` alike; rank 0
    alone writes, and the caller holds the folder's lock on rank 0. Each rank loads ``last.pt``
    itself (written atomically, and only after an epoch every rank has finished).
    """
    out_dir = Path(out_dir)
    fingerprint = fingerprint or {}
    model.to(device=device, memory_format=memory_format(device, cfg.channels_last))
    last = out_dir / "last.pt"
    distributed.per_rank_batch(cfg.batch_size, w.size)  # refused before anything is written

    found: dict = {}

    def check() -> bool:  # on rank 0: a refused checkpoint stops every rank
        out_dir.mkdir(parents=True, exist_ok=True)
        found["state"] = load_checkpoint(last, device) if last.exists() else None
        check_resumable(found["state"], fingerprint, last)
        return found["state"] is not None

    resuming = distributed.on_main(check, w)
    state = found["state"] if w.main else load_checkpoint(last, device) if resuming else None
    if state is None:
        prepare(model, train_source, cfg, seed)
        distributed.broadcast_modules([model], w)  # every rank starts from rank 0's initial weights
    else:
        prepare(model, train_source, cfg.model_copy(update={"whiten_init": False}), seed)  # the weights are loaded
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = max(len(train_source) // cfg.batch_size, 1) if len(train_source) > cfg.batch_size else 1
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    averages = Averages(model, cfg)
    flips = flip_choices(len(train_source), seed) if cfg.augment.flip == "alternating" else None
    snapshots = Snapshots(
        out_dir / "snapshots",
        cfg.snapshots.epochs if cfg.snapshots.epochs == "all" else set(cfg.snapshots.epochs),
        cfg.snapshots.every_steps,
    )

    start_epoch, step, elapsed, trained = 0, 0, 0.0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        averages.load_state_dict(state.get("averages", {}))
        start_epoch, step, elapsed = state["epoch"], state["step"], state["seconds"]
        trained = state.get("train_seconds", elapsed)
    if w.main:
        _truncate_metrics(out_dir / "metrics.jsonl", start_epoch)
    step_model = distributed.wrap(model, device, w)  # rank 0's weights on every rank from here

    def test(net):
        return evaluate(net, test_source, cfg.eval_batch_size, device, cfg.amp, cfg.channels_last, cfg.tta, w)

    bar = tqdm(
        range(start_epoch + 1, cfg.epochs + 1),
        desc=desc,
        initial=start_epoch,
        total=cfg.epochs,
        unit="epoch",
        disable=None if w.main else True,
        leave=False,
    )
    final = None
    for epoch in bar:
        t0 = time.perf_counter()
        train_metrics, step = train_one_epoch(
            model,
            train_source,
            optimizer,
            scheduler,
            cfg,
            epoch_generator(seed, epoch),
            device,
            step,
            snapshots if w.main else None,
            epoch,
            averages,
            flips,
            w,
            step_model,
            augment_generator(seed, epoch, w),
        )
        if w.distributed:  # BatchNorm statistics are each rank's own after its last step: keep rank 0's
            distributed.broadcast_tensors([*model.buffers(), *_averaged_buffers(averages)], w)
        if epoch == cfg.epochs:
            averages.finish(model)
        trained += time.perf_counter() - t0
        row = {"epoch": epoch, "step": step, **train_metrics}
        if epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0):
            final = test(averages.evaluated(model))
            row.update(test_loss=final[0]["loss"], test_accuracy=final[0]["accuracy"])
        elapsed += time.perf_counter() - t0
        row.update(train_seconds=round(trained, 2), seconds=round(elapsed, 2))
        if w.main:
            _save_epoch(out_dir, row, snapshots, averages, model, epoch, step)
            save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "averages": averages.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "seconds": elapsed,
                    "train_seconds": trained,
                    "fingerprint": fingerprint,
                },
                last,
            )
        postfix = {"loss": f"{train_metrics['train_loss']:.3f}"}
        if "test_accuracy" in row:
            postfix["test_acc"] = f"{row['test_accuracy']:.3f}"
        bar.set_postfix(postfix)
    bar.close()

    if averages.ema is not None:
        model.load_state_dict(averages.ema.model.state_dict())
    if final is None:  # resumed after the last epoch, or no epochs at all
        final = test(model)
    summary = {
        "test_accuracy": final[0]["accuracy"],
        "test_loss": final[0]["loss"],
        "epochs": cfg.epochs,
        "steps": step,
        "seconds": round(elapsed, 2),
        "train_seconds": round(trained, 2),
    }
    return summary, final[1]


def _averaged_buffers(averages: Averages) -> list[torch.Tensor]:
    return list(averages.ema.model.buffers()) if averages.ema is not None else []


def _save_epoch(out_dir: Path, row: dict, snapshots: Snapshots, averages: Averages, model, epoch: int, step: int):
    """An epoch's metrics line and, if one is due, its snapshot (on rank 0)."""
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if snapshots.at_epoch(epoch):
        snapshots.save(averages.evaluated(model), epoch, step, f"epoch_{epoch:04d}")


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
