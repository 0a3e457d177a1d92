"""ROAR and KAR retraining sweeps (Hooker et al., NeurIPS 2019): remove (ROAR) or keep (KAR) the
top t% of each image by each method's map, retrain from scratch with the base recipe, and
report test accuracy on the equally ablated test set.

A sweep is a deterministic list of runs (mode × method × threshold × seed, plus the unmodified
model at threshold 0; with ``retrain.leakage``, also models trained on the removal mask alone). Each
finished run appends one row to ``results.csv`` with the inputs it was computed from
(``roar.stages.retrain.results``); a rerun reuses the rows whose inputs are today's, recomputes the
others and says why, and a run killed half-way resumes from its own checkpoint. ``--shard i/n``
takes every n-th run starting at i, so n processes share a sweep with no overlap and no gap.

The output folder has one writer: a whole sweep locks it exclusively; the shards of a sweep (and
the parent that starts them, ``retrain.jobs``) share it, each holding the lock of its own shard, so
the same shard twice, or a shard beside a whole sweep, is refused. All shards of a sweep must use
the same n (shards of different n would overlap: a row computed twice is still written once).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from roar.config import RunConfig, dump_config
from roar.core.atomic import remove_temporaries
from roar.core.device import resolve_device
from roar.core.errors import RoarError
from roar.core.locks import FileLock, output_folder
from roar.core.provenance import changed_keys, fingerprint, record_run, write_json
from roar.data import Dataset, build_dataset
from roar.models import build_model
from roar.perturb.fills import build_fill
from roar.stages.extract import open_maps, store_path
from roar.stages.result import StageResult
from roar.stages.retrain.data import ablated_source, check_granularity
from roar.stages.retrain.jobs import run_shards
from roar.stages.retrain.results import append_result, prune, read_results, row_key
from roar.stages.retrain.summary import summarise
from roar.stages.reuse import Reuse
from roar.stages.train import check_run_model
from roar.training.checkpoint import load_checkpoint
from roar.training.config import SnapshotConfig, TrainingConfig
from roar.training.sources import source_for
from roar.training.trainer import fit

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


def retrain(cfg: RunConfig, dataset: Dataset, run: Run, out: Path, device, inputs: dict) -> dict:
    """One run: a fresh model of the base model's architecture, trained from scratch (never from
    pretrained weights) with the retraining recipe on the run's data; returns its row.

    A checkpoint left in ``out`` by a killed run is resumed only if it was made from the same
    ``inputs``; otherwise it is discarded and the run starts over."""
    training = retraining_recipe(cfg)
    torch.manual_seed(run.seed)
    scratch = cfg.model.model_copy(update={"weights": None}) if getattr(cfg.model, "weights", None) else cfg.model
    model = build_model(scratch, dataset.num_classes, dataset.train.geometry, dataset.mean, dataset.std)
    train_source, test_source = _sources(cfg, dataset, run, device)
    identity = {
        "run": "/".join(run.key),
        "inputs": fingerprint(inputs),
        "recipe": json.dumps(
            training.model_dump(mode="json", exclude={"eval_batch_size", "num_workers"}), sort_keys=True
        ),
    }
    discard_stale_checkpoint(out, identity)
    summary, _ = fit(
        model, train_source, test_source, training, out, run.seed, device, desc=run.folder, fingerprint=identity
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


def discard_stale_checkpoint(folder: Path, identity: dict) -> None:
    """Delete a run's checkpoint folder if its checkpoint was made for other inputs (or is unreadable)."""
    last = folder / "last.pt"
    if not last.exists():
        return
    try:
        same = load_checkpoint(last).get("fingerprint") == identity
    except RoarError:
        same = False
    if not same:
        shutil.rmtree(folder, ignore_errors=True)


def run_inputs(cfg: RunConfig, dataset_fingerprint: str, base_model: str, digests: dict, key: tuple) -> dict | None:
    """What the row of run ``key`` (mode, method, threshold, seed) is computed from; None if the
    method's maps are not stored. ``digests[method]`` holds the content digests of its train and test maps."""
    mode, method = key[0], key[1]
    inputs = {
        "dataset": dataset_fingerprint,
        "model": cfg.model.model_dump(mode="json"),
        "recipe": retraining_recipe(cfg).model_dump(
            mode="json", exclude={"eval_batch_size", "num_workers", "snapshots", "eval_every"}
        ),
        "seed": cfg.seed,
    }
    if mode == "baseline":
        return inputs
    if method not in digests:
        return None
    inputs["maps"] = digests[method]
    inputs["base_model"] = base_model  # the model whose maps are removed or kept
    inputs["retrain"] = {"granularity": cfg.retrain.granularity}
    if mode != LEAK:  # a leakage model sees the mask alone: the fill plays no part
        inputs["retrain"]["fill"] = cfg.retrain.fill.model_dump(mode="json")
    return inputs


def _locks(out: Path, shard: tuple[int, int], jobs: int) -> list:
    """The locks a sweep holds on its folder: exclusive for a whole sweep in one process; shared, plus
    the lock of its own shard (or of the set of jobs), for a sweep split over processes."""
    i, n = shard
    if n > 1:
        return [output_folder(out, shared=True), FileLock(out / f"shard-{i}-of-{n}")]
    if jobs > 1:
        return [output_folder(out, shared=True), FileLock(out / "jobs")]
    return [output_folder(out)]


def run(cfg: RunConfig, modes: list[str], shard: str | None = None) -> StageResult:
    """``roar retrain``: run (this shard of) the sweep for ``modes``, then summarise all results."""
    i, n = parse_shard(shard)
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.dataset)
    base_model = check_run_model(cfg)
    stored, digests = [], {}
    for split in ("test", "train"):  # retraining reads the train maps, testing the test maps
        with open_maps(cfg, dataset, split) as store:
            check_granularity(store, cfg.retrain.granularity)
            stored.append(store.methods)
            for method in store.methods:
                digests.setdefault(method, {})[split] = store.digest(method)
    store_methods = [m for m in stored[0] if m in stored[1]]
    digests = {m: d for m, d in digests.items() if m in store_methods}
    recipe = retraining_recipe(cfg)
    build_fill(cfg.retrain.fill, mean=dataset.mean)  # a fill that cannot be built is refused before any write
    everything = plan(cfg, modes, store_methods)
    runs = everything[i::n]
    inputs = {run.key: run_inputs(cfg, dataset.fingerprint(), base_model, digests, run.key) for run in everything}

    def current(key: tuple) -> dict | None:
        return inputs[key] if key in inputs else run_inputs(cfg, dataset.fingerprint(), base_model, digests, key)

    out = cfg.run_dir / "retrain"
    results = out / "results.csv"
    jobs = min(cfg.retrain.jobs, len(runs))
    with contextlib.ExitStack() as held:
        for lock in _locks(out, (i, n), jobs):
            held.enter_context(lock)
        (out / "settings.json").unlink(missing_ok=True)  # written by earlier versions
        kept, removed = prune(results, current)
        reuse, dropped = Reuse(), 0
        for row, recorded in removed:
            if row_key(row) in inputs:
                reuse.stale(row["method"], None if recorded is None else changed_keys(recorded, inputs[row_key(row)]))
            else:
                dropped += 1
        done = {row_key(row) for row in kept}
        todo = [run for run in runs if run.key not in done]
        provenance = {"name": recipe.recipe, **recipe.model_dump(mode="json", exclude={"recipe", "snapshots"})}

        def record() -> None:
            record_run(
                out, cfg, {"dataset": dataset.fingerprint(), "maps": digests}, device, retraining_recipe=provenance
            )

        record()
        t0 = time.perf_counter()
        jobs = min(jobs, len(todo))
        if jobs > 1 and n == 1:  # the shards in child processes; each writes its own rows
            single = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"jobs": 1})})
            total = len(done | {run.key for run in runs})  # rows results.csv holds when every shard is done
            run_shards(dump_config(single), modes, jobs, out, lambda: len(read_results(results)), total)
            record()  # the shards recorded their own single-job config and command: this run's are the parent's
        else:
            for run in tqdm(todo, desc="retrain", unit="run", disable=None):
                folder = out / "runs" / run.folder
                remove_temporaries(folder)  # a killed run's; this process alone computes this run
                append_result(results, retrain(cfg, dataset, run, folder, device, inputs[run.key]), inputs[run.key])
                shutil.rmtree(folder, ignore_errors=True)  # the row is the result; checkpoints were for resuming
        current_rows = [r for r in read_results(results) if r.get("inputs") == _hash(current(row_key(r)))]
        summary = summarise(out, current_rows, dataset.num_classes)
        s = {
            "runs": len(runs),
            "ran": len(todo),
            "recomputed": reuse.recomputed,
            "removed": dropped,
            "recipe": recipe.recipe or "custom",
            "epochs": recipe.epochs,
            "seconds": round(time.perf_counter() - t0, 1),
            **summary,
        }
        write_json(out / "summary.json", s)
    notes = [reuse.note(len(runs))] if reuse.recomputed else []
    if dropped:
        notes.append(f"{dropped} row{'s' if dropped > 1 else ''} of earlier inputs outside this sweep removed")
    why = f" ({'; '.join(notes)})" if notes else ""
    line = (
        f"{'/'.join(modes)}: ran {s['ran']} of {s['runs']} retraining runs{why} ({s['recipe']} recipe, "
        f"{s['epochs']} epochs each) in {s['seconds']:.0f} s; results, summary and plot -> {s['output']}"
    )
    return StageResult(s, line)


def _hash(inputs: dict | None) -> str | None:
    return None if inputs is None else fingerprint(inputs)
