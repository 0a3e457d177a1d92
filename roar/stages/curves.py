"""``roar curves`` (alias ``roar lerf``): perturbation curves of every stored method, without retraining.

For each method in the store (and the random-order control, reported as method ``random_order``) and each
order (MoRF, LeRF), the engine in ``roar.perturb.curves`` replaces growing shares of each image and
records every curve measure registered in ``roar.metrics`` per step (today accuracy, the probability
of the clean prediction and its relative change). Columns, tables and panels come from those
measures, so a new measure appears in all three without an edit here. Outputs in ``<run>/curves/`` (``curves.folder``):

* ``results.csv``: ``method, order, granularity, fill, step, fraction``, a column per measure
  (``accuracy, probability, relative_change``), ``images``; a row per curve point;
* ``summary.csv`` / ``summary.md``: each measure's areas (``CurveMeasure.areas``: trapezoid over the
  fraction removed) per method and order, and LeRF − MoRF (large for accuracy and probability when
  the map ranks well: removing the least relevant pixels first should hurt least); ``summary.md``
  heads each table with the measure's better direction;
* ``curves.png``: a panel per measure, a colour per method, MoRF solid, LeRF dashed, random dotted.

Each finished curve (a method and an order) goes to ``parts/<method>.<order>.json`` at once, with the
inputs it was computed from (``part_inputs``: the maps' content digest, the model's hash, the dataset's
fingerprint, the curve settings, the seed and the measures). A rerun reuses a part only while those
inputs match, recomputes the others and says why in its summary line (``roar.stages.reuse``); a
killed run resumes with the curves still missing, and adding an order computes only that order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from roar.attribution.engine import prepare_model
from roar.config import RunConfig
from roar.core.atomic import write_text_atomic
from roar.core.device import resolve_device
from roar.core.errors import RoarError
from roar.core.locks import output_folder
from roar.core.plots import pyplot, save_figure
from roar.core.provenance import record_run, write_json
from roar.core.tables import write_csv
from roar.data import build_dataset
from roar.metrics import CurveMeasure, curve_measures
from roar.perturb.curves import CurveSums, curve_sums, softmax
from roar.perturb.fills import build_fill
from roar.stages.extract import open_maps, store_path, trained_model_hash
from roar.stages.result import StageResult
from roar.stages.reuse import Reuse
from roar.stages.train import load_run_model

RANDOM = "random_order"  # the method name of the random-order control (it uses no map)
SUPPLIES = frozenset({"model", "maps"})  # what this stage hands its measures (``Metric.needs``)


def columns(measures: list[CurveMeasure]) -> list[str]:
    """The columns of ``results.csv``: the curve point, a column per measure, the number of images."""
    return ["method", "order", "granularity", "fill", "step", "fraction", *(m.name for m in measures), "images"]


def subset(n: int, max_images: int | None, seed: int) -> torch.Tensor:
    """Rows to evaluate, ascending: all of them, or a seeded random sample of ``max_images``."""
    if max_images is None or max_images >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values


def part_inputs(cfg: RunConfig, dataset_fingerprint: str, model_hash: str, maps: str | None, measures) -> dict:
    """What one curve (a method and an order) is computed from: a part is reused only while these match."""
    inputs = {
        "dataset": dataset_fingerprint,
        "model_hash": model_hash,  # the model measured, and the one the maps come from
        "curves": cfg.curves.model_dump(mode="json", exclude={"methods", "orders", "batch_size", "amp", "folder"}),
        "seed": cfg.seed,
        "measures": [m.name for m in measures],
    }
    if maps is not None:
        inputs["maps"] = maps  # the content digest of the method's stored maps
    return inputs


def part_path(parts: Path, method: str, order: str) -> Path:
    return parts / f"{method}.{order}.json"


def read_part(path: Path) -> dict | None:
    """A finished curve (``{"inputs", "rows"}``), or None if missing or unreadable (then it is recomputed)."""
    try:
        part = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return part if isinstance(part, dict) and {"inputs", "rows"} <= set(part) else None


def _rows(method: str, order: str, cfg: RunConfig, sums: CurveSums) -> list[dict]:
    means = sums.means()
    return [
        {
            "method": method,
            "order": order,
            "granularity": cfg.curves.granularity,
            "fill": cfg.curves.fill.name,
            "step": step.step,
            "fraction": f"{step.fraction:.6g}",
            **{name: f"{values[i]:.6f}" for name, values in means.items()},
            "images": sums.images,
        }
        for i, step in enumerate(sums.steps)
    ]


def run(cfg: RunConfig) -> StageResult:
    """``roar curves`` for a run: curves for every configured method and order; returns a summary."""
    t0 = time.perf_counter()
    lc = cfg.curves
    measures = curve_measures()
    unmet = {m.name: sorted(m.needs - SUPPLIES) for m in measures if not m.needs <= SUPPLIES}
    if unmet:
        raise RoarError(f"curve measures need what 'roar curves' does not supply ({sorted(SUPPLIES)}): {unmet}")
    header = columns(measures)
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.dataset)
    split = dataset.split(lc.split)
    path = store_path(cfg, lc.split)
    model, _, model_path = load_run_model(cfg, dataset, device)
    with open_maps(cfg, dataset, lc.split) as store:
        if store.channels:
            raise RoarError(f"{path} keeps one map per channel; perturbation curves need maps reduced over channels")
        methods = lc.methods if lc.methods is not None else store.methods
        missing = [m for m in methods if m not in store.methods]
        if missing:
            raise RoarError(
                f"curves.methods: {', '.join(missing)} not in {path} (it has {', '.join(store.methods)}); "
                "add them to attribution.methods and rerun extract"
            )
        digests = {m: store.digest(m) for m in methods}
    fill = build_fill(lc.fill, mean=dataset.mean)
    model_hash = trained_model_hash(cfg)
    curves = [(m, [o for o in lc.orders if o != "random"]) for m in methods]
    if "random" in lc.orders:
        curves.append((RANDOM, ["random"]))
    curves = [(m, orders) for m, orders in curves if orders]
    inputs = {m: part_inputs(cfg, dataset.fingerprint(), model_hash, digests.get(m), measures) for m, _ in curves}

    out = cfg.run_dir / lc.folder
    with output_folder(out):
        parts = out / "parts"
        for legacy in [out / "settings.json", *parts.glob("*.csv")]:  # written by earlier versions
            legacy.unlink(missing_ok=True)
        record_run(out, cfg, {"dataset": dataset.fingerprint(), "model": model_hash, "maps": digests}, device)
        reuse = Reuse()
        todo = []
        for method, orders in curves:
            missing = []
            for order in orders:
                part = read_part(part_path(parts, method, order))
                if part is None or not reuse.fresh(method, part["inputs"], inputs[method]):
                    missing.append(order)
            if missing:
                todo.append((method, missing))
        rows = subset(len(split), lc.max_images, cfg.seed)
        probe = split.read(rows[: min(16, len(rows))]).float().div_(255)
        model = prepare_model(model, device, probe=probe)
        _compute(cfg, dataset, split, model, fill, measures, rows, todo, inputs, parts)
        results = [r for m, orders in curves for o in orders for r in read_part(part_path(parts, m, o))["rows"]]
        write_csv(out / "results.csv", results, header)
        table = summarise(out, results, measures)
        total = sum(len(orders) for _, orders in curves)
        s = {
            "methods": len(methods),
            "images": len(rows),
            "ran": sum(len(orders) for _, orders in todo),
            "curves": total,
            "recomputed": reuse.recomputed,
            "seconds": round(time.perf_counter() - t0, 1),
            "output": str(out),
            "model": str(model_path),
            "areas": table,
        }
        write_json(out / "summary.json", s)
    why = f"; {reuse.note(total)}" if reuse.recomputed else ""
    line = (
        f"perturbation curves of {s['methods']} methods on {s['images']} images ({s['ran']} of {total} curves "
        f"computed{why}) in {s['seconds']:.0f} s; results, summary and plot -> {s['output']}"
    )
    return StageResult(s, line)


def _compute(cfg: RunConfig, dataset, split, model, fill, measures, rows, todo, inputs, parts: Path) -> None:
    """Compute the curves ``todo`` (method, orders) and write each as ``parts/<method>.<order>.json``."""
    lc = cfg.curves
    path = store_path(cfg, lc.split)
    device = next(model.parameters()).device
    batches = [rows[a : a + lc.batch_size] for a in range(0, len(rows), lc.batch_size)]
    bar = tqdm(total=len(todo) * len(batches), desc="curves", unit="batch", disable=None)
    with open_maps(cfg, dataset, lc.split) as store:
        for method, orders in todo:
            bar.set_postfix_str(method)
            sums: dict[str, CurveSums] = {}
            for idx in batches:
                images = split.read(idx, cfg.training.num_workers).to(device).float().div_(255)
                labels = split.labels[idx].to(device)
                indices = idx.to(device)
                maps = None
                if method != RANDOM:
                    maps = torch.from_numpy(store.read_rows(method, idx.numpy())).to(device)
                    if not torch.isfinite(maps).all():
                        raise RoarError(f"{path}: method {method} has NaN or infinite maps among rows {idx.tolist()}")
                clean = softmax(model, images, lc.amp)
                for order in orders:
                    s = curve_sums(
                        model,
                        images,
                        labels,
                        indices,
                        maps,
                        order,
                        lc.steps,
                        fill,
                        measures=measures,
                        seed=cfg.seed,
                        granularity=lc.granularity,
                        patch=lc.patch_size,
                        amp=lc.amp,
                        clean=clean,
                    )
                    if order in sums:
                        sums[order].add(s)
                    else:
                        sums[order] = s
                bar.update()
            for order in orders:
                part = {"inputs": inputs[method], "rows": _rows(method, order, cfg, sums[order])}
                write_json(part_path(parts, method, order), part)
    bar.close()


# --------------------------------------------------------------------------------------------- summary


def areas(results: list[dict], measures: list[CurveMeasure] | None = None) -> list[dict]:
    """Per method: each measure's areas (``CurveMeasure.areas``), as ``<measure>_<order>`` per order
    and ``<measure>_lerf_minus_morf``: all orders' areas first, the differences after."""
    measures = curve_measures() if measures is None else measures
    table = []
    curves = _group(results)
    for method in dict.fromkeys(m for m, _ in curves):
        orders = {o: points for (m, o), points in curves.items() if m == method}
        summaries = {}
        for measure in measures:
            summaries[measure.name] = measure.areas(
                {
                    order: ([float(r["fraction"]) for r in points], [float(r[measure.name]) for r in points])
                    for order, points in orders.items()
                }
            )
        entry = {"method": method}
        for key in [*orders, "lerf_minus_morf"]:
            for measure in measures:
                if key in summaries[measure.name]:
                    entry[f"{measure.name}_{key}"] = summaries[measure.name][key]
        table.append(entry)
    return table


BETTER = {"higher": "higher is better", "lower": "lower is better"}


def _markdown(table: list[dict], results: list[dict], measures: list[CurveMeasure]) -> str:
    first = results[0] if results else {}
    lines = [
        f"Perturbation curves on {first.get('images', '?')} images, granularity {first.get('granularity', '?')}, "
        f"fill {first.get('fill', '?')}: area under each curve over the fraction removed (trapezoid rule). "
        "A ranking that finds what the model uses scores well on MoRF and on LeRF − MoRF, in the direction "
        "each heading names; the random order is the baseline.\n",
    ]
    for measure in measures:
        morf, contrast = (BETTER[measure.direction_of(k)] for k in ("morf", "lerf_minus_morf"))
        better = f"MoRF: {morf}; LeRF − MoRF: {contrast}"
        lines += [f"### {measure.title} — {better}\n", "| method | MoRF | LeRF | LeRF − MoRF |", "|---|---:|---:|---:|"]
        for row in table:
            if row["method"] == RANDOM:
                value = row.get(f"{measure.name}_random")
                if value is not None:
                    lines.append(f"| random order | {value:.4f} | {value:.4f} | 0 |")
                continue
            cells = [row.get(f"{measure.name}_{k}") for k in ("morf", "lerf", "lerf_minus_morf")]
            lines.append(f"| {row['method']} | " + " | ".join("" if v is None else f"{v:.4f}" for v in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(results: list[dict], path: Path, measures: list[CurveMeasure]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(measures), figsize=(5.2 * len(measures), 4.2), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in results if r["method"] != RANDOM))
    palette = [*plt.cm.tab10.colors, *plt.cm.Dark2.colors, *plt.cm.Set1.colors]
    colours = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    styles = {"morf": "-", "lerf": "--", "random": ":"}
    for ax, measure in zip(axes[0], measures, strict=True):
        for (method, order), points in _group(results).items():
            xs = [100 * float(r["fraction"]) for r in points]
            ys = [float(r[measure.name]) for r in points]
            colour = "black" if method == RANDOM else colours[method]
            label = "random order" if method == RANDOM else (method if order == "morf" else None)
            ax.plot(xs, ys, styles[order], color=colour, marker=".", markersize=4, linewidth=1.3, label=label)
        ax.set_xlabel("positions removed (%)")
        ax.set_ylabel(measure.axis)
        ax.set_title(measure.axis)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=7, frameon=False)
    fig.suptitle("MoRF solid, LeRF dashed, random order dotted")
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    save_figure(fig, path)


def _group(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in results:
        groups.setdefault((row["method"], row["order"]), []).append(row)
    return {k: sorted(v, key=lambda r: int(r["step"])) for k, v in groups.items()}


def summarise(out: Path, results: list[dict], measures: list[CurveMeasure] | None = None) -> list[dict]:
    """Write ``summary.csv``, ``summary.md`` and ``curves.png`` into ``out``; returns the area table."""
    measures = curve_measures() if measures is None else measures
    table = areas(results, measures)
    columns = ["method", *dict.fromkeys(k for row in table for k in row if k != "method")]
    fixed = [{k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()} for row in table]
    write_csv(out / "summary.csv", fixed, columns)
    write_text_atomic(out / "summary.md", _markdown(table, results, measures))
    if results:
        plot_curves(results, out / "curves.png", measures)
    return table
