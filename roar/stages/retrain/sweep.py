"""ROAR and KAR retraining sweeps (Hooker et al., NeurIPS 2019): remove (ROAR) or keep (KAR) the
top t% of each image by each method's map, retrain from scratch with the base recipe, and
report test accuracy on the equally ablated test set.

A sweep is a deterministic list of runs (mode × method × threshold × seed, plus the unmodified
model at threshold 0; with ``retrain.leakage``, also models trained on the removal mask alone). Each
finished run appends one row to ``results.csv``; a rerun skips the rows already there, and a run
killed half-way resumes from its own checkpoint. ``--shard i/n`` takes every n-th run starting at
i, so n processes share a sweep with no overlap and no gap.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from roar.config import RunConfig, dump_config
from roar.core.device import resolve_device
from roar.core.errors import RoarError
from roar.core.locks import FileLock
from roar.core.provenance import guard_settings, record_run
from roar.data import Dataset, build_dataset
from roar.models import build_model
from roar.perturb.fills import build_fill
from roar.stages.extract import open_maps, store_path, trained_model_hash
from roar.stages.result import StageResult
from roar.stages.retrain.data import ablated_source
from roar.stages.retrain.jobs import run_shards
from roar.stages.retrain.summary import summarise
from roar.training.config import SnapshotConfig, TrainingConfig
from roar.training.sources import source_for
from roar.training.trainer import fit

COLUMNS = ["mode", "method", "threshold", "seed", "test_accuracy", "test_loss", "epochs", "seconds"]
BASELINE = "unmodified"  # the method name of the runs on unmodified images (threshold 0)
LEAK = "leak"  # the mode of models trained on the removal mask alone; threshold = % of pixels removed


@dataclass(frozen=True)
class Run:
    mode: str
    method: str
    threshold: float
    seed: int

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.mode, self.method, f"{self.threshold:g}", str(self.seed))

    @property
    def folder(self) -> str:
        return f"{self.mode}-{self.method}-{self.threshold:g}-seed{self.seed}"


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 ≤ i < n; None → the whole sweep."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise RoarError(f"--shard '{text}': expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise RoarError(f"--shard '{text}': need 0 <= i < n")
    return i, n


def plan(cfg: RunConfig, modes: list[str], store_methods: list[str]) -> list[Run]:
    """Every run of the sweep, in a fixed order: baselines first, then mode, method, threshold, seed."""
    r = cfg.retrain
    methods = r.methods if r.methods is not None else store_methods
    missing = [m for m in methods if m not in store_methods]
    if missing:
        raise RoarError(
            f"retrain.methods: {', '.join(missing)} not in both attribution stores, train and test (both have "
            f"{', '.join(store_methods)}); add them to attribution.methods (and its splits) and rerun extract"
        )
    seeds = [cfg.seed + s for s in range(r.seeds)]
    runs = [Run("baseline", BASELINE, 0.0, s) for s in seeds]
    runs += [Run(mode, m, float(t), s) for mode in modes for m in methods for t in r.thresholds for s in seeds]
    # One seed each: a diagnostic, not a result; by the share removed (KAR's masks are ROAR's complements).
    runs += [Run(LEAK, m, t, seeds[0]) for m in methods for t in r.leakage_removed(modes)]
    return runs


def read_results(path: Path) -> list[dict]:
    """The rows of ``results.csv``; a torn last line (a kill mid-append) is ignored."""
    if not path.exists():
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(path.read_text())):
        if row.get("seconds") not in (None, ""):
            rows.append(row)
    return rows


def append_result(path: Path, row: dict) -> None:
    """One line, appended under an exclusive lock (shards wait their turn) and fsynced: shards may share the file."""
    with FileLock(path, blocking=True), open(path, "a+", newline="") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            f.write(",".join(COLUMNS) + "\n")
        else:  # a line torn by a kill would otherwise merge with this one
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        csv.writer(f, lineterminator="\n").writerow([row[c] for c in COLUMNS])
        f.flush()
        os.fsync(f.fileno())


class MaskOnly:
    """The binary removal mask as the only input (Rong et al. 2022): whatever a model learns from it
    is class information leaking through the *shape* of the removed region, not the pixels left."""

    def __init__(self, source):
        if not hasattr(source, "removed_for"):
            raise RoarError("the leakage diagnostic needs the in-memory path: set retrain.streaming=false")
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False):
        for _, labels, idx in self.source.batches(batch_size, generator, drop_last):
            yield self.source.removed_for(idx).float(), labels, idx


def _sources(cfg: RunConfig, dataset: Dataset, run: Run, device):
    """Train and test batch sources of one run: ablated by the run's method, or unmodified."""
    r = cfg.retrain
    if run.mode == "baseline":
        return (source_for(dataset.train, device, r.num_workers), source_for(dataset.test, device, r.num_workers))
    leak = run.mode == LEAK
    # A leakage run's model sees only the mask: no fill values are needed (a ROAD solve would be wasted).
    fill = build_fill("mean" if leak else r.fill, mean=dataset.mean)
    sources = tuple(
        ablated_source(
            dataset.split(split),
            store_path(cfg, split),
            run.method,
            run.threshold / 100,
            "roar" if leak else run.mode,
            fill,
            seed=cfg.seed,
            granularity=r.granularity,
            device=device,
            streaming=r.streaming,
            num_workers=r.num_workers,
            dataset_name=dataset.name,
            split_name=split,
        )
        for split in ("train", "test")
    )
    return tuple(MaskOnly(source) for source in sources) if leak else sources


def retraining_recipe(cfg: RunConfig) -> TrainingConfig:
    """The training section every retrain of the sweep uses (``retrain.training``; 'base': the base model's
    own), without snapshots and tested once at the end: a retrain's result is its row."""
    recipe = cfg.training if cfg.retrain.training == "base" else cfg.retrain.training
    if recipe.epochs == 0:
        raise RoarError(
            "retrain.training.epochs: set the retraining epochs "
            "(the recipe has 0 epochs: the base model is not trained)"
        )
    return recipe.model_copy(update={"snapshots": SnapshotConfig(), "eval_every": 0})


def retrain(cfg: RunConfig, dataset: Dataset, run: Run, out: Path, device) -> dict:
    """One run: a fresh model of the base model's architecture, trained from scratch (never from
    pretrained weights) with the retraining recipe on the run's data; returns its row."""
    training = retraining_recipe(cfg)
    torch.manual_seed(run.seed)
    scratch = cfg.model.model_copy(update={"weights": None}) if getattr(cfg.model, "weights", None) else cfg.model
    model = build_model(scratch, dataset.num_classes, dataset.train.geometry, dataset.mean, dataset.std)
    train_source, test_source = _sources(cfg, dataset, run, device)
    fingerprint = {
        "run": "/".join(run.key),
        "dataset": dataset.fingerprint(),
        "recipe": json.dumps(
            training.model_dump(mode="json", exclude={"eval_batch_size", "num_workers"}), sort_keys=True
        ),
    }
    summary, _ = fit(
        model, train_source, test_source, training, out, run.seed, device, desc=run.folder, fingerprint=fingerprint
    )
    return {
        "mode": run.mode,
        "method": run.method,
        "threshold": f"{run.threshold:g}",
        "seed": run.seed,
        "test_accuracy": f"{summary['test_accuracy']:.6f}",
        "test_loss": f"{summary['test_loss']:.6f}",
        "epochs": summary["epochs"],
        "seconds": summary["seconds"],
    }


def check_settings(out: Path, cfg: RunConfig) -> None:
    """One results.csv holds runs of one protocol: refuse to mix in runs made with other settings.

    Methods, thresholds, seeds and modes may grow (new rows); anything that changes what a row
    means (the retraining recipe, fill, granularity, tie-break seed, dataset, model, and the base
    model the maps were computed from) may not.
    """
    settings = {
        "dataset": cfg.dataset.model_dump(mode="json", exclude={"root", "cache"}),
        "model": cfg.model.model_dump(mode="json"),
        "recipe": retraining_recipe(cfg).model_dump(
            mode="json", exclude={"eval_batch_size", "num_workers", "snapshots", "eval_every"}
        ),
        "retrain": cfg.retrain.model_dump(mode="json", include={"granularity", "fill"}),
        "seed": cfg.seed,
        "maps_model_hash": trained_model_hash(cfg),  # the base model whose maps are removed or kept
    }
    guard_settings(out, settings, "ROAR/KAR results")


def run(cfg: RunConfig, modes: list[str], shard: str | None = None) -> StageResult:
    """``roar retrain``: run (this shard of) the sweep for ``modes``, then summarise all results."""
    i, n = parse_shard(shard)
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.dataset)
    stored = []
    for split in ("test", "train"):  # retraining reads the train maps, testing the test maps
        with open_maps(cfg, dataset, split) as store:
            stored.append(store.methods)
    store_methods = [m for m in stored[0] if m in stored[1]]
    out = cfg.run_dir / "retrain"
    results = out / "results.csv"
    check_settings(out, cfg)
    runs = plan(cfg, modes, store_methods)[i::n]
    done = {tuple(row[c] for c in ("mode", "method", "threshold", "seed")) for row in read_results(results)}
    todo = [run for run in runs if run.key not in done]
    recipe = retraining_recipe(cfg)
    provenance = {"name": recipe.recipe, **recipe.model_dump(mode="json", exclude={"recipe", "snapshots"})}

    def record() -> None:
        record_run(out, cfg, {"dataset": dataset.fingerprint()}, device, retraining_recipe=provenance)

    record()
    t0 = time.perf_counter()
    jobs = min(cfg.retrain.jobs, len(todo))
    if jobs > 1 and n == 1:  # the shards in child processes; each writes its own rows
        single = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"jobs": 1})})
        total = len(done | {run.key for run in runs})  # rows results.csv holds when every shard is done
        run_shards(dump_config(single), modes, jobs, out, lambda: len(read_results(results)), total)
        record()  # the shards recorded their own single-job config and command: this run's are the parent's
    else:
        for run in tqdm(todo, desc="retrain", unit="run", disable=None):
            folder = out / "runs" / run.folder
            append_result(results, retrain(cfg, dataset, run, folder, device))
            shutil.rmtree(folder, ignore_errors=True)  # the row is the result; checkpoints were for resuming
    summary = summarise(out, read_results(results), dataset.num_classes)
    s = {
        "runs": len(runs),
        "ran": len(todo),
        "recipe": recipe.recipe or "custom",
        "epochs": recipe.epochs,
        "seconds": round(time.perf_counter() - t0, 1),
        **summary,
    }
    line = (
        f"{'/'.join(modes)}: ran {s['ran']} of {s['runs']} retraining runs ({s['recipe']} recipe, "
        f"{s['epochs']} epochs each) in {s['seconds']:.0f} s; results, summary and plot -> {s['output']}"
    )
    return StageResult(s, line)
