"""``roar lerf``: perturbation curves of every stored method on the trained model, no retraining.

For each method in the store (and the random-order control, reported as method ``none``) and each
order (MoRF, LeRF), the engine in ``roar.perturb.curves`` replaces growing shares of each image and
records accuracy, the probability of the clean prediction and its relative change per step.
Outputs in ``<run>/lerf/``:

* ``results.csv``: ``method, order, granularity, fill, step, fraction, accuracy, probability,
  relative_change, images``, a row per curve point;
* ``summary.csv`` / ``summary.md``: the area under each curve (trapezoid over the fraction removed)
  per method and order, and LeRF − MoRF (large for accuracy and probability when the map ranks
  well: removing the least relevant pixels first should hurt least);
* ``curves.png``: a panel per measure, a colour per method, MoRF solid, LeRF dashed, random dotted.

A finished method's curves go to ``parts/<method>.csv`` at once, so a killed run resumes with the
methods still missing; one folder holds one protocol (``settings.json`` refuses a change).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from roar.atomic import write_text_atomic
from roar.attribution.engine import prepare_model
from roar.attribution.extract import store_path
from roar.attribution.store import AttributionStore
from roar.config import RunConfig
from roar.data import build_dataset
from roar.device import resolve_device
from roar.errors import RoarError
from roar.evaluation.fills import build_fill
from roar.perturb.curves import MEASURES, CurveSums, PatchMeanFill, area, curve_sums, softmax
from roar.plots import pyplot, save_figure
from roar.provenance import guard_settings, record_run
from roar.tables import read_csv, write_csv
from roar.training import load_run_model

COLUMNS = ["method", "order", "granularity", "fill", "step", "fraction", *MEASURES, "images"]
RANDOM = "none"  # the method name of the random-order control (it uses no map)


def subset(n: int, max_images: int | None, seed: int) -> torch.Tensor:
    """Rows to evaluate, ascending: all of them, or a seeded random sample of ``max_images``."""
    if max_images is None or max_images >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values


def _build_fill(cfg: RunConfig, mean):
    params = {k: v for k, v in cfg.lerf.fill.items() if k != "name"}
    if cfg.lerf.fill["name"] == "patch_mean":
        if params:
            raise RoarError(f"lerf.fill: patch_mean takes no parameters (the patch is lerf.patch_size), got {params}")
        return PatchMeanFill(cfg.lerf.patch_size)
    return build_fill(cfg.lerf.fill["name"], mean=mean, **params)


def _settings(cfg: RunConfig) -> dict:
    return {
        "dataset": cfg.dataset.model_dump(mode="json", exclude={"root", "cache"}),
        "model": cfg.model.model_dump(mode="json"),
        "lerf": cfg.lerf.model_dump(mode="json", exclude={"methods", "orders", "batch_size", "amp"}),
        "seed": cfg.seed,
    }


def _rows(method: str, order: str, cfg: RunConfig, sums: CurveSums) -> list[dict]:
    means = sums.means()
    return [
        {
            "method": method,
            "order": order,
            "granularity": cfg.lerf.granularity,
            "fill": cfg.lerf.fill["name"],
            "step": step.step,
            "fraction": f"{step.fraction:.6g}",
            **{m: f"{means[m][i]:.6f}" for m in MEASURES},
            "images": sums.images,
        }
        for i, step in enumerate(sums.steps)
    ]


def run(cfg: RunConfig) -> dict:
    """``roar lerf`` for a run: curves for every configured method and order; returns a summary."""
    t0 = time.perf_counter()
    lc = cfg.lerf
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.dataset)
    split = dataset.split(lc.split)
    path = store_path(cfg, lc.split)
    if not path.exists():
        raise RoarError(f"no attribution maps for the {lc.split} split at {path}: run 'roar extract' first")
    model, _, model_path = load_run_model(cfg, dataset, device)
    with AttributionStore.open(path) as store:
        store.validate_for(
            dataset=dataset.name,
            split=lc.split,
            n=len(split),
            geometry=split.geometry,
            dataset_fingerprint=split.fingerprint(),
        )
        if store.channels:
            raise RoarError(f"{path} keeps one map per channel; perturbation curves need maps reduced over channels")
        methods = lc.methods if lc.methods is not None else store.methods
        missing = [m for m in methods if m not in store.methods]
        if missing:
            raise RoarError(
                f"lerf.methods: {', '.join(missing)} not in {path} (it has {', '.join(store.methods)}); "
                "add them to attribution.methods and rerun extract"
            )
    out = cfg.run_dir / "lerf"
    guard_settings(out, _settings(cfg), "perturbation curves")
    record_run(out, cfg, {"dataset": dataset.fingerprint(), "maps": str(path)}, device)
    rows = subset(len(split), lc.max_images, cfg.seed)
    probe = split.read(rows[: min(16, len(rows))]).float().div_(255)
    model = prepare_model(model, device, probe=probe)
    fill = _build_fill(cfg, dataset.mean)

    curves = [(m, [o for o in lc.orders if o != "random"]) for m in methods]
    if "random" in lc.orders:
        curves.append((RANDOM, ["random"]))
    parts = out / "parts"
    todo = [(m, orders) for m, orders in curves if orders and not (parts / f"{m}.csv").exists()]
    batches = [rows[a : a + lc.batch_size] for a in range(0, len(rows), lc.batch_size)]
    bar = tqdm(total=len(todo) * len(batches), desc="lerf", unit="batch", disable=None)
    with AttributionStore.open(path) as store:
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
            write_csv(parts / f"{method}.csv", [r for o in orders for r in _rows(method, o, cfg, sums[o])], COLUMNS)
    bar.close()
    results = [r for m, orders in curves if orders for r in read_csv(parts / f"{m}.csv")]
    write_csv(out / "results.csv", results, COLUMNS)
    table = summarise(out, results)
    return {
        "methods": len(methods),
        "images": len(rows),
        "ran": len(todo),
        "seconds": round(time.perf_counter() - t0, 1),
        "output": str(out),
        "model": str(model_path),
        "areas": table,
    }


# --------------------------------------------------------------------------------------------- summary


def areas(results: list[dict]) -> list[dict]:
    """Per method: the area under each (order, measure) curve and LeRF − MoRF per measure."""
    table = []
    curves = _group(results)
    for method in dict.fromkeys(m for m, _ in curves):
        entry = {"method": method}
        for (m, order), points in curves.items():
            if m != method:
                continue
            fractions = [float(r["fraction"]) for r in points]
            for measure in MEASURES:
                entry[f"{measure}_{order}"] = area(fractions, [float(r[measure]) for r in points])
        for measure in MEASURES:
            if f"{measure}_morf" in entry and f"{measure}_lerf" in entry:
                entry[f"{measure}_lerf_minus_morf"] = entry[f"{measure}_lerf"] - entry[f"{measure}_morf"]
        table.append(entry)
    return table


def _markdown(table: list[dict], results: list[dict]) -> str:
    first = results[0] if results else {}
    lines = [
        f"Perturbation curves on {first.get('images', '?')} images, granularity {first.get('granularity', '?')}, "
        f"fill {first.get('fill', '?')}: area under each curve over the fraction removed (trapezoid rule). "
        "A ranking that finds what the model uses has a small MoRF area and a large LeRF − MoRF for "
        "accuracy and probability (the reverse for the relative change).\n",
    ]
    names = {
        "accuracy": "Accuracy",
        "probability": "Probability of the clean prediction",
        "relative_change": "Relative change (%)",
    }
    for measure in MEASURES:
        lines += [f"### {names[measure]}\n", "| method | MoRF | LeRF | LeRF − MoRF |", "|---|---:|---:|---:|"]
        for row in table:
            if row["method"] == RANDOM:
                value = row.get(f"{measure}_random")
                if value is not None:
                    lines.append(f"| random order | {value:.4f} | {value:.4f} | 0 |")
                continue
            cells = [row.get(f"{measure}_{k}") for k in ("morf", "lerf", "lerf_minus_morf")]
            lines.append(f"| {row['method']} | " + " | ".join("" if v is None else f"{v:.4f}" for v in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5.2 * len(MEASURES), 4.2), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in results if r["method"] != RANDOM))
    palette = [*plt.cm.tab10.colors, *plt.cm.Dark2.colors, *plt.cm.Set1.colors]
    colours = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    styles = {"morf": "-", "lerf": "--", "random": ":"}
    labels = {"accuracy": "accuracy", "probability": "p(clean prediction)", "relative_change": "relative change (%)"}
    for ax, measure in zip(axes[0], MEASURES, strict=True):
        for (method, order), points in _group(results).items():
            xs = [100 * float(r["fraction"]) for r in points]
            ys = [float(r[measure]) for r in points]
            colour = "black" if method == RANDOM else colours[method]
            label = "random order" if method == RANDOM else (method if order == "morf" else None)
            ax.plot(xs, ys, styles[order], color=colour, marker=".", markersize=4, linewidth=1.3, label=label)
        ax.set_xlabel("positions removed (%)")
        ax.set_ylabel(labels[measure])
        ax.set_title(labels[measure])
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


def summarise(out: Path, results: list[dict]) -> list[dict]:
    """Write ``summary.csv``, ``summary.md`` and ``curves.png`` into ``out``; returns the area table."""
    table = areas(results)
    columns = ["method", *dict.fromkeys(k for row in table for k in row if k != "method")]
    fixed = [{k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()} for row in table]
    write_csv(out / "summary.csv", fixed, columns)
    write_text_atomic(out / "summary.md", _markdown(table, results))
    if results:
        _plot(results, out / "curves.png")
    return table
