"""Tables and a plot of a ROAR/KAR sweep: mean ± std test accuracy per mode, method and threshold.

``summary.csv`` is for code, ``summary.md`` for pasting into a paper, ``accuracy.png`` for looking:
accuracy against the share of pixels removed (ROAR) or kept (KAR), a line per method with
standard-deviation error bars, the random control dashed, the unmodified model as the common
point where nothing is removed (ROAR 0%, KAR 100%), chance dotted, the whole 0-100% axis.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from roar.core.atomic import write_text_atomic
from roar.core.plots import pyplot, save_figure
from roar.core.tables import write_csv

CONTROLS = ("random", "sobel")


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean, sample std and count of test accuracy per (mode, method, threshold)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        groups[(row["mode"], row["method"], float(row["threshold"]))].append(float(row["test_accuracy"]))
    out = []
    for (mode, method, threshold), values in sorted(groups.items()):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(
            {
                "mode": mode,
                "method": method,
                "threshold": threshold,
                "mean": statistics.fmean(values),
                "std": std,
                "n": len(values),
            }
        )
    return out


def _markdown(table: list[dict]) -> str:
    baseline = [r for r in table if r["mode"] == "baseline"]
    lines = []
    if baseline:
        b = baseline[0]
        lines.append(f"Unmodified model: {100 * b['mean']:.2f} ± {100 * b['std']:.2f}% test accuracy (n = {b['n']}).\n")
    present = {r["mode"] for r in table} - {"baseline"}
    for mode in [m for m in PANELS if m in present] + sorted(present - set(PANELS)):
        rows = [r for r in table if r["mode"] == mode]
        thresholds = sorted({r["threshold"] for r in rows})
        if mode == "leak":
            lines.append(
                "### Leakage: test accuracy (%) of a model trained on the removal mask alone, t% of the pixels "
                "removed (ROAR at t, KAR at 100 - t; chance is 1/#classes)\n"
            )
        else:
            verb = "removed" if mode == "roar" else "kept"
            lines.append(f"### {mode.upper()}: test accuracy (%) with the top t% of pixels {verb}\n")
        lines.append("| method | " + " | ".join(f"t = {t:g}%" for t in thresholds) + " |")
        lines.append("|---|" + "---:|" * len(thresholds))
        for method in sorted({r["method"] for r in rows}):
            cells = {r["threshold"]: r for r in rows if r["method"] == method}
            values = [
                f"{100 * cells[t]['mean']:.1f} ± {100 * cells[t]['std']:.1f}" if t in cells else "" for t in thresholds
            ]
            lines.append(f"| {method} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


PANELS = {
    "roar": ("ROAR: top t% removed, retrained", "top pixels removed (%)"),
    "kar": ("KAR: top t% kept, retrained", "top pixels kept (%)"),
    "leak": ("Leakage: trained on the removal mask alone", "pixels removed (%): ROAR's t, KAR's 100 - t"),
}
UNMODIFIED_AT = {"roar": 0.0, "kar": 100.0}
"""Where the unmodified model sits on each panel's axis: nothing removed, everything kept."""


def plot_accuracy(table: list[dict], path: Path, num_classes: int | None = None) -> None:
    plt = pyplot()
    present = {r["mode"] for r in table} - {"baseline"}
    modes = [m for m in PANELS if m in present] + sorted(present - set(PANELS))
    if not modes:
        return
    baseline = next((r for r in table if r["mode"] == "baseline"), None)
    cols = min(2, len(modes))  # ROAR and KAR side by side, their leakage panels below
    nrows = -(-len(modes) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(modes) :]:
        ax.set_visible(False)
    for ax, mode in zip(axes.flat, modes):
        rows = [r for r in table if r["mode"] == mode]
        for method in sorted({r["method"] for r in rows}):
            points = sorted((r["threshold"], r["mean"], r["std"]) for r in rows if r["method"] == method)
            if baseline is not None and mode in UNMODIFIED_AT:
                points = sorted([(UNMODIFIED_AT[mode], baseline["mean"], baseline["std"]), *points])
            xs, ys, es = zip(*points)
            style = "--" if method in CONTROLS else "-"
            ax.errorbar(
                xs,
                [100 * y for y in ys],
                yerr=[100 * e for e in es],
                linestyle=style,
                marker="o",
                capsize=3,
                label=method,
            )
        title, xlabel = PANELS.get(mode, (mode.upper(), "threshold (%)"))
        if num_classes:
            ax.axhline(100 / num_classes, color="grey", linewidth=0.8, linestyle=":", label="chance")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-5, 105)  # the whole range, whatever thresholds were run: never a one-point axis
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def summarise(out: Path, rows: list[dict], num_classes: int | None = None) -> dict:
    """Write ``summary.csv``, ``summary.md`` and ``accuracy.png`` (with a chance line at 1/``num_classes``)
    into ``out``."""
    table = aggregate(rows)
    write_csv(out / "summary.csv", table, ["mode", "method", "threshold", "mean", "std", "n"])
    write_text_atomic(out / "summary.md", _markdown(table))
    plot_accuracy(table, out / "accuracy.png", num_classes)
    return {"output": str(out), "groups": len(table)}
