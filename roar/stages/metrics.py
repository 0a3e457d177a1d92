"""``roar metrics``: every configured metric of every stored method, without retraining, and which
metric can be trusted.

1. The maps of ``metrics.methods`` (default: the store's) for a seeded subset of the split, read
   from the attribution store; the model, the masks and each method itself (rebuilt from the
   store's record of it) for the metrics that need them.
2. Each metric (``metrics.metrics``, default every registered one the dataset supports) per
   method: one value per image, averaged. A (method, metric) result is kept in
   ``parts/<method>.<metric>.json`` with the inputs it was computed from (the maps' content
   digest, the model, the data, the metric's parameters, the images, the seed) and reused while
   they match: a killed run resumes, a rerun recomputes only what changed and says why.
3. Meta-evaluation (``roar.stages.meta``): how well each metric recovers the known order of the
   controls (``metrics.known_order``) when they are in the store, and how the metrics agree.

Outputs in ``<run>/metrics/``: ``results.csv`` (method, metric, value, std, higher_is_better,
images), ``summary.md``, ``ranks.png`` (methods × metrics, ranked), ``meta.csv``, ``agreement.csv``,
``config.yaml``, ``provenance.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from roar.attribution import Context, create, explainer
from roar.attribution.engine import prepare_model
from roar.config import RunConfig
from roar.config.metrics import MetricEntry, evaluable
from roar.core.device import resolve_device
from roar.core.errors import RoarError
from roar.core.locks import output_folder
from roar.core.provenance import fingerprint, record_run, write_json
from roar.core.tables import write_csv
from roar.data import build_dataset
from roar.metrics import METRICS
from roar.metrics.randomisation import barely_changes
from roar.stages import meta
from roar.stages.curves import subset
from roar.stages.extract import open_maps, store_path, trained_model_hash
from roar.stages.result import StageResult
from roar.stages.reuse import Reuse
from roar.stages.train import load_run_model

COLUMNS = ["method", "metric", "value", "std", "higher_is_better", "images"]


def chosen_metrics(cfg: RunConfig, has_masks: bool) -> list[MetricEntry]:
    """The configured metrics, or every evaluable one the dataset supports (masks)."""
    if cfg.metrics.metrics is not None:
        entries = cfg.metrics.metrics
        if not has_masks:
            needing = [e.name for e in entries if "masks" in METRICS.get(e.name).needs]
            if needing:
                raise RoarError(
                    f"metrics.metrics: {', '.join(needing)} need ground-truth masks, which dataset "
                    f"'{cfg.dataset.name}' does not have"
                )
        return list(entries)
    return [MetricEntry(name=name) for name in evaluable() if has_masks or "masks" not in METRICS.get(name).needs]


def part_path(parts: Path, method: str, metric: str) -> Path:
    return parts / f"{method}.{metric}.json"


def read_part(path: Path) -> dict | None:
    try:
        part = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return part if isinstance(part, dict) and {"inputs", "values"} <= set(part) else None


def run(cfg: RunConfig) -> StageResult:
    """``roar metrics`` for a run; everything that can refuse it is checked before anything is written."""
    t0 = time.perf_counter()
    mc = cfg.metrics
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.dataset)
    split = dataset.split(mc.split)
    trained, _, _ = load_run_model(cfg, dataset, device)
    entries = chosen_metrics(cfg, split.masks is not None)
    if not entries:
        raise RoarError("metrics.metrics: no metric to compute")
    path = store_path(cfg, mc.split)
    with open_maps(cfg, dataset, mc.split) as store:
        if store.channels:
            raise RoarError(f"{path} keeps one map per channel; the metrics need maps reduced over channels")
        methods = mc.methods if mc.methods is not None else list(store.methods)
        missing = [m for m in methods if m not in store.methods]
        if missing:
            raise RoarError(
                f"metrics.methods: {', '.join(missing)} not in {path} (it has {', '.join(store.methods)}); "
                "add them to attribution.methods and rerun extract"
            )
        digests = {m: store.digest(m) for m in methods}
        identities = {m: store.identity_of(m) for m in methods}
        target = store.identity.get("target", "predicted")
        reduction = store.identity.get("reduction", "sum_squares")
    recomputing = [e.name for e in entries if "explain" in METRICS.get(e.name).needs]
    plugins = [m for m in methods if _method_of(identities[m]) is None]
    if recomputing and plugins:
        raise RoarError(
            f"metrics.metrics: {', '.join(recomputing)} recompute maps, which plug-in method(s) "
            f"{', '.join(plugins)} cannot; leave them out with metrics.methods or metrics.metrics"
        )
    model_hash = trained_model_hash(cfg)
    rows = subset(len(split), mc.max_images, cfg.seed)
    base = {
        "dataset": dataset.fingerprint(),
        "model_hash": model_hash,
        "split": mc.split,
        "rows": fingerprint(rows.tolist()),
        "seed": cfg.seed,
        "target": target,
        "reduction": reduction,
    }

    def inputs_of(method: str, entry: MetricEntry) -> dict:
        return {**base, "maps": digests[method], "metric": entry.name, "params": entry.params}

    out = cfg.run_dir / "metrics"
    with output_folder(out):
        parts = out / "parts"
        parts.mkdir(exist_ok=True)
        record_run(out, cfg, {"dataset": base["dataset"], "model": model_hash, "maps": digests}, device)
        reuse = Reuse()
        todo = [
            (m, e)
            for m in methods
            for e in entries
            if not _fresh(reuse, m, read_part(part_path(parts, m, e.name)), inputs_of(m, e))
        ]
        if todo:
            probe = split.read(rows[:16]).float().div_(255).to(device)
            model = prepare_model(trained, device, probe=probe)
            stored = (target, reduction)
            _compute(cfg, dataset, split, model, rows, todo, identities, stored, inputs_of, parts, device)
        results = [_result_row(m, e, read_part(part_path(parts, m, e.name))) for m in methods for e in entries]
        for stale in parts.glob("*.json"):  # parts of methods or metrics this run no longer asks for
            if stale.stem not in {f"{m}.{e.name}" for m in methods for e in entries}:
                stale.unlink()
        write_csv(out / "results.csv", results, COLUMNS)
        evaluation = meta.evaluate(cfg, results, _per_image(parts, methods, entries))
        evaluation.summary["barely_change"] = flagged = _barely_changing(parts, methods, entries)
        meta.write(out, cfg, results, evaluation, flagged)
    note = reuse.note(len(methods) * len(entries))
    summary = {
        "methods": methods,
        "metrics": [e.name for e in entries],
        "images": len(rows),
        "computed": len(todo),
        "recomputed": note,
        "meta": evaluation.summary,
        "seconds": round(time.perf_counter() - t0, 2),
        "output": str(out),
    }
    write_json(out / "summary.json", summary)
    line = (
        f"metrics: {len(entries)} metrics × {len(methods)} methods on {len(rows)} images "
        f"({len(todo)} of {len(entries) * len(methods)} computed) in {summary['seconds']:.0f} s"
    )
    if evaluation.summary.get("best"):
        line += f"; best at recovering the known order: {evaluation.summary['best']}"
    line += f"; results, ranks and meta-evaluation -> {out}"
    return StageResult(summary, line + (f"; {note}" if note else ""))


def _fresh(reuse: Reuse, method: str, part: dict | None, inputs: dict) -> bool:
    """Whether a finished part can be reused; a missing one is simply computed (not counted as stale)."""
    return part is not None and reuse.fresh(method, part["inputs"], inputs)


def _per_image(parts: Path, methods: list[str], entries: list[MetricEntry]) -> dict:
    """{(method, metric): per-image values} of every finished part."""
    out = {}
    for m in methods:
        for e in entries:
            part = read_part(part_path(parts, m, e.name))
            if part is not None:
                out[(m, e.name)] = np.asarray(part["values"], dtype=np.float64)
    return out


def _barely_changing(parts: Path, methods: list[str], entries: list[MetricEntry]) -> dict[str, float]:
    """{method: mean Spearman similarity after the whole model is randomised} of the methods whose maps
    barely change under cascading randomisation (``barely_changes``), when that metric was computed."""
    if "model_randomisation" not in {e.name for e in entries}:
        return {}
    out = {}
    for m in methods:
        part = read_part(part_path(parts, m, "model_randomisation"))
        last = (part or {}).get("companions", {}).get("model_randomisation_last")
        if last is not None and barely_changes(last):
            out[m] = round(float(np.mean(last)), 4)
    return out


def _result_row(method: str, entry: MetricEntry, part: dict) -> dict:
    values = np.asarray(part["values"], dtype=np.float64)
    cls = METRICS.get(entry.name)
    return {
        "method": method,
        "metric": entry.name,
        "value": float(values.mean()) if len(values) else math.nan,
        "std": float(values.std()) if len(values) else math.nan,
        "higher_is_better": cls.direction == "higher",
        "images": len(values),
    }


def _method_of(identity: dict):
    """The attribution method a store set was made by, rebuilt from its record (None for plug-ins)."""
    name = identity.get("method")
    if name is None or "." in str(name):
        return None
    return create(name, **identity.get("params", {}))


def _compute(cfg, dataset, split, model, rows, todo, identities, stored, inputs_of, parts: Path, device) -> None:
    """Evaluate every (method, metric) of ``todo`` batch by batch; each finished pair is written at once
    with its per-image values and the per-image companions the metric returns beside them."""
    mc = cfg.metrics
    target, reduction = stored
    by_method: dict[str, list[MetricEntry]] = {}
    for method, entry in todo:
        by_method.setdefault(method, []).append(entry)
    bar = tqdm(total=len(todo), desc="metrics", unit="pair", leave=False, disable=None)
    with open_maps(cfg, dataset, mc.split) as store:
        predictions = torch.as_tensor(store.predictions)
        for method, entries in by_method.items():
            attribution = _method_of(identities[method])  # None only for plug-ins, refused above when needed
            metrics = [(e, METRICS.create(e.name, **e.params)) for e in entries]
            values: dict[str, dict[str, list[torch.Tensor]]] = {e.name: {} for e, _ in metrics}
            maps_all = torch.as_tensor(store.read_rows(method, rows.numpy()))
            for start in range(0, len(rows), mc.batch_size):
                index = rows[start : start + mc.batch_size]
                images = split.read(index).float().div_(255).to(device)
                labels = split.labels[index].to(device)
                masks = None if split.masks is None else split.masks[index].bool().to(device)
                context = Context(indices=index.to(device), masks=masks)
                batch = {
                    "images": images,
                    "labels": labels,
                    "indices": index.to(device),
                    "maps": maps_all[start : start + mc.batch_size].to(device),
                    "masks": masks,
                    "model": model,
                    "targets": (predictions[index] if target == "predicted" else split.labels[index]).to(device),
                    "explain": None if attribution is None else explainer(attribution, reduction, cfg.seed, context),
                }
                for entry, metric in metrics:
                    for key, value in metric.evaluate_batch(**batch).items():
                        values[entry.name].setdefault(key, []).append(value.detach().float().cpu())
            for entry, _ in metrics:
                found = {key: torch.cat(chunks).numpy() for key, chunks in values[entry.name].items()}
                if not np.isfinite(found[entry.name]).all():
                    raise RoarError(f"metric '{entry.name}' gave NaN or Inf for method '{method}'")
                part = {
                    "inputs": inputs_of(method, entry),
                    "values": found.pop(entry.name).tolist(),
                    "companions": {key: v.tolist() for key, v in found.items()},
                }
                write_json(part_path(parts, method, entry.name), part)
                bar.update()
    bar.close()
