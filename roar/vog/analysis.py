"""What VoG says about a split: deciles of error, per-class image grids, agreement with known
difficulty and with the peer scores.

All functions take plain arrays (one entry per example of the analysed split), so they work on
any dataset; ``roar.stages.vog.stage`` feeds them and writes the files:

* ``decile_table``: the final model's error rate per decile of each VoG variant. Ten bins by
  rank, ties broken by the example index, every example in exactly one bin (sizes differ by at
  most one). VoG's claim is that the error rate rises with the decile.
* ``auroc_table``: how well each score flags the examples a generator made hard on purpose
  (the built-in ``shapes`` tags every example: clean, low contrast, occluded, two objects),
  as ``sklearn.metrics.roc_auc_score``; 0.5 is chance, higher flags hard examples better.
* ``correlation_table``: Spearman's ρ (``scipy.stats.spearmanr``) between the VoG variants and
  the peer scores.
* ``plot_deciles`` and ``plot_grid``: the figures.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from roar.core.plots import pyplot, save_figure

PEERS = ("el2n", "forgetting", "confidence", "variability", "grand")
# Scores where a *low* value marks a hard example are flipped so that every AUROC reads "higher = harder".
FLIPPED = {"confidence": "low_confidence"}
BINS = 10


# ----------------------------------------------------------------------------------------------- tables


def decile_bins(scores: np.ndarray, index: np.ndarray | None = None, bins: int = BINS) -> np.ndarray:
    """Bin 0..bins-1 of each example by the rank of its score (ties: smaller index first)."""
    scores = np.asarray(scores, dtype=np.float64)
    index = np.arange(len(scores)) if index is None else np.asarray(index)
    order = np.lexsort((index, scores))
    out = np.empty(len(scores), dtype=np.int64)
    out[order] = np.arange(len(scores)) * bins // max(1, len(scores))
    return out


def decile_table(variants: dict[str, np.ndarray], correct: np.ndarray, index: np.ndarray) -> list[dict]:
    """Rows {score, decile (1-based), examples, errors, error_rate, score_min, score_max} per variant."""
    wrong = ~np.asarray(correct, dtype=bool)
    rows = []
    for name, scores in variants.items():
        bins = decile_bins(scores, index)
        for d in range(BINS):
            sel = bins == d
            count = int(sel.sum())
            rows.append(
                {
                    "score": name,
                    "decile": d + 1,
                    "examples": count,
                    "errors": int(wrong[sel].sum()),
                    "error_rate": float(wrong[sel].mean()) if count else math.nan,
                    "score_min": float(scores[sel].min()) if count else math.nan,
                    "score_max": float(scores[sel].max()) if count else math.nan,
                }
            )
    return rows


def _auroc(hard: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if hard.all() or not hard.any():
        return math.nan
    return float(roc_auc_score(hard, scores))


def auroc_table(
    scores: dict[tuple[str, str], np.ndarray], tags: np.ndarray, tag_names: Sequence[str], split: str
) -> list[dict]:
    """Per score ({(name, stage): [N]}): AUROC of flagging tag != clean (tag 0), and of each hard tag
    against the clean examples alone."""
    tags = np.asarray(tags)
    hard = tags != 0
    rows = []
    for (name, stage), values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        if name in FLIPPED:
            name, values = FLIPPED[name], -values
        row = {"split": split, "score": name, "stage": stage, "auroc": _auroc(hard, values)}
        for t, tag in enumerate(tag_names):
            if t:
                sel = (tags == 0) | (tags == t)
                row[tag] = _auroc(tags[sel] == t, values[sel])
        row["clean"], row["hard"] = int((~hard).sum()), int(hard.sum())
        rows.append(row)
    return rows


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman's ρ and its p-value (``scipy.stats.spearmanr``); NaN when either side is constant
    or not finite."""
    from scipy.stats import spearmanr

    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant score has no rank correlation: NaN
        result = spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def correlation_table(vog: dict[str, np.ndarray], peers: dict[str, np.ndarray], split: str) -> list[dict]:
    """Spearman's ρ and its p-value between each VoG variant and each peer score."""
    rows = []
    for a, x in vog.items():
        for b, y in peers.items():
            rho, p = spearman(x, y)
            rows.append({"split": split, "vog": a, "peer": b, "rho": rho, "p": p})
    return rows


# ------------------------------------------------------------------------------------------- writing


def _pct(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.1f}%"


def _num(value: float, digits: int = 3) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def deciles_markdown(rows: list[dict], split: str, stage: str) -> str:
    variants = list(dict.fromkeys(r["score"] for r in rows))
    by = {(r["score"], r["decile"]): r for r in rows}
    lines = [
        f"Error rate of the final model per VoG decile, {split} split, {stage} stage (decile 1: lowest VoG; "
        "ten bins by rank, ties by index).\n",
        "| decile | examples | " + " | ".join(f"error, {v}" for v in variants) + " |",
        "|---:|---:|" + "---:|" * len(variants),
    ]
    for d in range(1, BINS + 1):
        first = by[(variants[0], d)]
        cells = " | ".join(_pct(by[(v, d)]["error_rate"]) for v in variants)
        lines.append(f"| {d} | {first['examples']} | {cells} |")
    return "\n".join(lines) + "\n"


def auroc_markdown(rows: list[dict], tag_names: Sequence[str]) -> str:
    hard_tags = list(tag_names[1:])
    lines = [
        "AUROC of each score at flagging the examples made hard on purpose (tag ≠ clean), and each hard tag "
        "against the clean examples; 0.5 is chance. `low_confidence` is 1 − data-map confidence.\n",
        "| split | score | stage | hard vs clean | " + " | ".join(hard_tags) + " |",
        "|---|---|---|---:|" + "---:|" * len(hard_tags),
    ]
    for r in rows:
        cells = " | ".join(_num(r.get(t, math.nan)) for t in hard_tags)
        lines.append(f"| {r['split']} | {r['score']} | {r['stage'] or '—'} | {_num(r['auroc'])} | {cells} |")
    if rows:
        first = rows[0]
        lines.append(f"\n{first['split']}: {first['hard']} hard and {first['clean']} clean examples.")
    return "\n".join(lines) + "\n"


def correlations_markdown(rows: list[dict]) -> str:
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    lines = [
        "Spearman's ρ between VoG (complete stage) and the peer scores, per split.\n",
        "| split | VoG | " + " | ".join(peers) + " |",
        "|---|---|" + "---:|" * len(peers),
    ]
    by = {(r["split"], r["vog"], r["peer"]): r["rho"] for r in rows}
    for split, vog in dict.fromkeys((r["split"], r["vog"]) for r in rows):
        lines.append(f"| {split} | {vog} | " + " | ".join(_num(by[(split, vog, p)]) for p in peers) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- figures


def plot_deciles(rows: list[dict], overall_error: float, path: Path, split: str, stage: str) -> None:
    """Grouped bars: the error rate per decile of each VoG variant, the overall error dashed."""
    plt = pyplot()
    variants = list(dict.fromkeys(r["score"] for r in rows))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, variant in enumerate(variants):
        points = sorted((r for r in rows if r["score"] == variant), key=lambda r: r["decile"])
        xs = np.array([r["decile"] for r in points]) + (i - (len(variants) - 1) / 2) * width
        ax.bar(xs, [100 * r["error_rate"] for r in points], width=width, label=variant)
    ax.axhline(100 * overall_error, color="black", linestyle="--", linewidth=1, label="all examples")
    top = max([100 * r["error_rate"] for r in rows if not math.isnan(r["error_rate"])] + [100 * overall_error, 1e-9])
    ax.set_ylim(0, 1.3 * top)  # headroom for the legend above the bars
    ax.set_xticks(range(1, BINS + 1))
    ax.set_xlabel("VoG decile (1 = lowest VoG, 10 = highest)")
    ax.set_ylabel("error rate of the final model (%)")
    ax.set_title(f"Error rate per VoG decile ({split} split, {stage} stage)")
    ax.legend(frameon=False, ncol=len(variants) + 1, loc="upper center", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_grid(
    low: list[tuple[np.ndarray, str, bool, float]],
    high: list[tuple[np.ndarray, str, bool, float]],
    title: str,
    path: Path,
) -> None:
    """Two rows of images (lowest VoG above, highest below), each captioned with its predicted label
    (green when correct, red when wrong) and its VoG. Images are uint8 [C, H, W].

    Each row is one montage drawn by a single ``imshow``: a figure of 16 small axes takes ten
    times longer to lay out and save.
    """
    plt = pyplot()
    cols = max(len(low), len(high), 1)
    fig, axes = plt.subplots(2, 1, figsize=(1.3 * cols + 1.0, 4.2))
    for ax, row, label in zip(axes, (low, high), ("lowest VoG", "highest VoG"), strict=True):
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_ylabel(label, fontsize=9)
        if not row:
            continue
        c, h, w = row[0][0].shape
        gap = max(1, w // 8)
        canvas = np.full((h, cols * (w + gap) - gap, c), 255, dtype=np.uint8)
        for i, (image, predicted, correct, score) in enumerate(row):
            x = i * (w + gap)
            canvas[:, x : x + w] = np.transpose(image, (1, 2, 0))
            colour = "tab:green" if correct else "tab:red"
            ax.text(x + w / 2, -1, f"{predicted}\nVoG {score:.2g}", ha="center", va="bottom", fontsize=7, color=colour)
        ax.imshow(canvas[..., 0] if c == 1 else canvas, cmap="gray", interpolation="nearest", aspect="equal")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def file_names(class_names: Sequence[str]) -> list[str]:
    """A safe file stem per class; repeated names (ImageNet has some) get the class index appended."""
    stems = [re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or f"class_{i}" for i, name in enumerate(class_names)]
    return [f"{s}_{i}" if stems.count(s) > 1 else s for i, s in enumerate(stems)]
