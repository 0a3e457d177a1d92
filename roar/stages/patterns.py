"""``roar patterns``: the signal patterns of the run's trained model, estimated from its training images.

PatternNet, PatternAttribution and PGIG (``roar.attribution.pattern_methods``) need, for every layer
followed by a ReLU, a pattern estimated from data (``roar.attribution.patterns``). This stage estimates
them once per trained model and keeps them in ``<run>/patterns/``:

* ``patterns.h5``: the patterns of every layer, with the inputs they were estimated from (the model's
  hash, the training split's fingerprint, the number of images and the subset's seed, the architecture)
  and a content digest, which ``roar extract`` records in its provenance and in the identity of each
  map computed with them;
* ``summary.json``: per layer the share of positive outputs and the number of dead channels;
* ``config.yaml``, ``provenance.json`` as every stage.

``roar extract`` calls ``ensure`` itself when a configured method needs patterns, so running this stage
first is optional. A rerun reuses the file while its inputs match and otherwise recomputes it, saying
why ("recomputed: the trained model changed"). The estimation streams over fixed batches of a seeded
subset and checkpoints its float64 sums (``partial.pt``, written atomically every
``patterns.checkpoint_every`` batches): a killed estimation resumes after its last checkpoint and ends
with the same patterns as an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from roar.attribution.patterns import FORMAT_VERSION, PatternEstimator, Patterns, load_patterns, save_patterns
from roar.config import RunConfig
from roar.core.atomic import replace_atomic
from roar.core.device import resolve_device
from roar.core.errors import RoarError
from roar.core.locks import output_folder
from roar.core.provenance import file_hash, fingerprint, record_run, write_json
from roar.data import Dataset, build_dataset
from roar.stages.result import StageResult
from roar.stages.reuse import Reuse
from roar.stages.train import load_run_model

RERUN = "roar patterns"


def patterns_path(cfg: RunConfig) -> Path:
    return cfg.run_dir / "patterns" / "patterns.h5"


def checkpoint_path(cfg: RunConfig) -> Path:
    return cfg.run_dir / "patterns" / "partial.pt"


def sample_rows(n: int, samples: int | None, seed: int) -> torch.Tensor:
    """Training rows to estimate from, ascending: all of them, or a seeded random sample."""
    if samples is None or samples >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].sort().values


def estimation_inputs(cfg: RunConfig, dataset: Dataset, model_hash: str, estimator: PatternEstimator) -> dict:
    """What the patterns are computed from: they are reused only while all of it matches."""
    n = len(dataset.train)
    subset = cfg.patterns.samples is not None and cfg.patterns.samples < n
    return {
        "model_hash": model_hash,
        "dataset": dataset.train.fingerprint(),
        "samples": min(cfg.patterns.samples or n, n),
        "seed": cfg.seed if subset else None,
        "architecture": fingerprint(estimator.structure.signature()),
        "format": FORMAT_VERSION,
    }


def _stored(path: Path) -> tuple[Patterns | None, str]:
    """The patterns in ``path`` if it holds readable ones, else None and why not ('' if there is no file)."""
    if not path.exists():
        return None, ""
    try:
        return load_patterns(path, RERUN), ""
    except RoarError:
        return None, "the stored patterns were unreadable"


def _load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a checkpoint of another roar or torch version: start again
        return None


def _estimate(cfg: RunConfig, dataset: Dataset, estimator: PatternEstimator, inputs: dict, device) -> tuple:
    """Stream the training subset through the estimator, checkpointing; (patterns, batches resumed)."""
    p = cfg.patterns
    rows = sample_rows(len(dataset.train), p.samples, cfg.seed)
    grid = [(start, min(start + p.batch_size, len(rows))) for start in range(0, len(rows), p.batch_size)]
    key = {**inputs, "batch_size": p.batch_size}  # the batch grid a checkpoint's count refers to
    checkpoint = checkpoint_path(cfg)
    state = _load_checkpoint(checkpoint)
    done = 0
    if state is not None and state.get("inputs") == key and 0 < state.get("batches", 0) <= len(grid):
        estimator.load_state_dict(state["estimator"])
        done = state["batches"]
    bar = tqdm(total=len(grid), initial=done, desc="patterns", unit="batch", disable=None, leave=False)
    for k in range(done, len(grid)):
        start, stop = grid[k]
        images = dataset.train.read(rows[start:stop], p.num_workers).to(device).float().div_(255)
        estimator.update(images)
        bar.update(1)
        if (k + 1) % p.checkpoint_every == 0 and k + 1 < len(grid):
            state = {"inputs": key, "batches": k + 1, "estimator": estimator.state_dict()}
            replace_atomic(checkpoint, lambda f, state=state: torch.save(state, f))
    bar.close()
    return estimator.result({"inputs": inputs}), done


def _layers(patterns: Patterns) -> list[dict]:
    return [
        {
            "layer": unit.name,
            "channels": len(unit.positive),
            "positive": round(float(unit.positive.mean()), 6),
            "dead_channels": int((unit.positive == 0).sum()),
        }
        for unit in patterns.units
    ]


def stale_reason(cfg: RunConfig, dataset: Dataset, model, model_hash: str) -> str | None:
    """Why the stored patterns would be estimated again ('' if there are none), or None if they are reused."""
    stored, _ = _stored(patterns_path(cfg))
    if stored is None:
        return ""
    old, new = stored.info.get("inputs"), estimation_inputs(cfg, dataset, model_hash, PatternEstimator(model))
    if old == new:
        return None
    reuse = Reuse()
    reuse.fresh(None, old, new)
    return reuse.why()


def ensure(cfg: RunConfig, dataset: Dataset, model, model_hash: str, device) -> tuple[Patterns, str]:
    """The patterns of the run's trained ``model`` (hash ``model_hash``): the stored ones while they match
    their inputs, else estimated now (resuming a killed estimation). Returns them and what was done:
    ``reused``, ``estimated`` or ``recomputed: <why>``, with ``resumed after k of n batches``."""
    path = patterns_path(cfg)
    estimator = PatternEstimator(model)
    inputs = estimation_inputs(cfg, dataset, model_hash, estimator)
    stored, _ = _stored(path)
    if stored is not None and stored.info.get("inputs") == inputs:
        return stored, "reused"
    t0 = time.perf_counter()
    with output_folder(path.parent) as folder:
        stored, unreadable = _stored(path)  # another process may have written them meanwhile
        reuse = Reuse()
        if stored is not None and reuse.fresh(None, stored.info.get("inputs"), inputs):
            return stored, "reused"
        patterns, resumed = _estimate(cfg, dataset, estimator, inputs, device)
        save_patterns(path, patterns)
        checkpoint_path(cfg).unlink(missing_ok=True)
        layers = _layers(patterns)
        record_run(folder, cfg, {"dataset": dataset.fingerprint(), "model": model_hash}, device)
        summary = {
            "digest": patterns.digest,
            "images": inputs["samples"],
            "layers": layers,
            "seconds": round(time.perf_counter() - t0, 2),
            "output": str(path),
        }
        write_json(folder / "summary.json", summary)
    if unreadable:
        status = f"recomputed: {unreadable}"
    elif reuse.recomputed:
        status = f"recomputed: {reuse.why()}"
    else:
        status = "estimated"
    if resumed:
        status += f", resumed after {resumed} batches"
    return patterns, status


def run(cfg: RunConfig) -> StageResult:
    """``roar patterns`` for a run: ``<run>/patterns/patterns.h5``; returns a summary."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.dataset)
    model, _, model_path = load_run_model(cfg, dataset, device)
    patterns, status = ensure(cfg, dataset, model, file_hash(model_path), device)
    path = patterns_path(cfg)
    summary = {
        "status": status,
        "layers": _layers(patterns),
        "images": patterns.info["inputs"]["samples"],
        "digest": patterns.digest,
        "seconds": round(time.perf_counter() - t0, 2),
        "output": str(path),
    }
    line = (
        f"patterns of {len(patterns.units)} layers from {summary['images']} training images {status} "
        f"in {summary['seconds']:.0f} s -> {path}"
    )
    return StageResult(summary, line)
