"""Which metric can be trusted: each metric against explanations of known quality, and the metrics
against each other.

On the built-in data some explanations are ordered by construction (``metrics.known_order``): the
oracle object mask (``ground_truth``) ≻ the oracle blurred or dilated ≻ the oracle with a share of
its pixels shuffled off the object ≻ ``random``. A metric that cannot recover that order from
their maps cannot be trusted to order real methods either. For every metric of ``roar metrics``
the agreement is τ over the pairs whose order is known (Somers' D of the metric's values given the
tiers: (concordant − discordant) / pairs in different tiers, values signed so that larger is
better; pairs within a tier are not judged, so a perfect metric scores 1 and a reversed one −1,
where Kendall's τ-b could not reach 1 with a tied tier), per image, then mean ± std over images;
τ of the mean values is the dataset-level answer. ROAR and KAR (per threshold, per seed, from
``retrain/results.csv``) and the perturbation curves (MoRF, LeRF and LeRF − MoRF accuracy areas of
every curves folder: the mean fill, ROAD, ...) are judged the same way when their results include
the controls; they have one value per method, so their τ is the dataset-level one (mean ± std
over seeds for ROAR and KAR).

Agreement between metrics: Kendall's τ between the rankings two metrics give the *other* methods
(the real ones), over the methods both scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from roar.core.atomic import write_text_atomic
from roar.core.plots import pyplot, save_figure
from roar.core.tables import read_csv, write_csv
from roar.metrics import METRICS

META_COLUMNS = ["measure", "family", "tau", "tau_std", "samples", "methods", "recovers"]
RECOVERS = 0.8  # τ at or above which a measure is said to recover the known order
MIN_TIERS = 3  # a measure is judged only on methods from at least this many tiers: with two, τ is ±1 by one pair


@dataclass
class Evaluation:
    known: list[dict] = field(default_factory=list)  # meta.csv: one row per measure
    agreement: list[dict] = field(default_factory=list)  # agreement.csv: one row per pair of metrics
    summary: dict = field(default_factory=dict)


def agreement(values: np.ndarray, quality: np.ndarray) -> float:
    """τ over the pairs of different quality: Somers' D(values | quality), in [−1, 1]; tied values
    count as neither right nor wrong; NaN when every method has the same quality."""
    if len(values) < 2 or np.all(quality == quality[0]):
        return math.nan
    known = np.sign(quality[:, None] - quality[None, :])
    found = np.sign(values[:, None] - values[None, :])
    return float((known * found).sum() / np.abs(known).sum())


def kendall(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's τ-b between two metrics' values (NaN when either is constant)."""
    from scipy.stats import kendalltau

    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(kendalltau(x, y).statistic)


def _quality(tiers: list[list[str]]) -> dict[str, int]:
    """method -> quality (higher is better): the best tier gets len(tiers) − 1, the worst 0."""
    return {m: len(tiers) - 1 - t for t, tier in enumerate(tiers) for m in tier}


def _row(measure: str, family: str, taus: list[float], samples: int, methods: list[str], overall=None) -> dict:
    finite = [t for t in taus if np.isfinite(t)]
    tau = overall if overall is not None else (float(np.mean(finite)) if finite else math.nan)
    return {
        "measure": measure,
        "family": family,
        "tau": tau,
        "tau_std": float(np.std(finite)) if len(finite) > 1 else math.nan,
        "samples": samples,
        "methods": " ".join(methods),
        "recovers": bool(np.isfinite(tau) and tau >= RECOVERS),
    }


def _metric_rows(per_image: dict, quality: dict[str, int]) -> list[dict]:
    rows = []
    for metric in sorted({k[1] for k in per_image}):
        sign = 1.0 if METRICS.get(metric).direction == "higher" else -1.0
        methods = [m for m in quality if (m, metric) in per_image]
        if len({quality[m] for m in methods}) < MIN_TIERS:
            continue
        values = np.stack([per_image[(m, metric)] for m in methods]) * sign  # [methods, images]
        q = np.array([quality[m] for m in methods], dtype=float)
        per = [agreement(values[:, i], q) for i in range(values.shape[1])]
        row = _row(metric, METRICS.get(metric).__module__.rsplit(".", 1)[-1], per, values.shape[1], methods)
        row["tau_of_means"] = agreement(values.mean(1), q)
        rows.append(row)
    return rows


CURVE_ORDERS = {"morf": -1.0, "lerf": 1.0, "lerf_minus_morf": 1.0}  # accuracy areas: signs so that larger is better
CURVE_NAMES = {"morf": "MoRF", "lerf": "LeRF", "lerf_minus_morf": "LeRF − MoRF"}


def curve_folders(run_dir: Path) -> list[Path]:
    """The run's curve folders (``curves``, ``curves_road``, ``degradation``, ...) holding results."""
    return sorted(p.parent for p in run_dir.glob("*/summary.csv") if p.parent.name.startswith(("curves", "degr")))


def retrain_values(run_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """{"ROAR 10%": {seed: {method: value}}} from ``retrain/results.csv``, larger is better: ROAR's
    accuracy negated (a good map's removal hurts most), KAR's as it is."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in read_csv(run_dir / "retrain" / "results.csv"):
        if r["mode"] in ("roar", "kar"):
            sign = -1.0 if r["mode"] == "roar" else 1.0
            measure = f"{r['mode'].upper()} {float(r['threshold']):g}%"
            out.setdefault(measure, {}).setdefault(str(r["seed"]), {})[r["method"]] = sign * float(r["test_accuracy"])
    mode_then_threshold = lambda item: (not item[0].startswith("ROAR"), float(item[0].split()[1].rstrip("%")))  # noqa: E731
    return dict(sorted(out.items(), key=mode_then_threshold))


def curve_values(run_dir: Path) -> dict[str, dict[str, float]]:
    """{"MoRF (curves)": {method: value}} of the accuracy areas of every curves folder, larger is better."""
    out: dict[str, dict[str, float]] = {}
    for folder in curve_folders(run_dir):
        for r in read_csv(folder / "summary.csv"):
            for order, sign in CURVE_ORDERS.items():
                value = r.get(f"accuracy_{order}")
                if value not in (None, ""):
                    out.setdefault(f"{CURVE_NAMES[order]} ({folder.name})", {})[r["method"]] = sign * float(value)
    return out


def _retrain_rows(run_dir: Path, quality: dict[str, int]) -> list[dict]:
    rows = []
    for measure, seeds in retrain_values(run_dir).items():
        taus, methods = [], sorted({m for values in seeds.values() for m in values if m in quality})
        for values in seeds.values():
            known = [m for m in values if m in quality]
            scores = np.array([values[m] for m in known])
            taus.append(agreement(scores, np.array([quality[m] for m in known], dtype=float)))
        if len({quality[m] for m in methods}) >= MIN_TIERS:
            rows.append(_row(measure, "retraining", taus, len(taus), methods))
    return rows


def _curve_rows(run_dir: Path, quality: dict[str, int]) -> list[dict]:
    rows = []
    for measure, values in curve_values(run_dir).items():
        methods = [m for m in values if m in quality]
        if len({quality[m] for m in methods}) < MIN_TIERS:
            continue
        scores = np.array([values[m] for m in methods])
        tau = agreement(scores, np.array([quality[m] for m in methods], dtype=float))
        rows.append(_row(measure, "curves", [tau], 1, methods))
    return rows


def _agreement(results: list[dict], controls: set[str]) -> list[dict]:
    table: dict[str, dict[str, float]] = {}
    for r in results:
        if r["method"] not in controls:
            sign = 1.0 if r["higher_is_better"] else -1.0
            table.setdefault(r["metric"], {})[r["method"]] = sign * float(r["value"])
    metrics = sorted(table)
    rows = []
    for i, a in enumerate(metrics):
        for b in metrics[i + 1 :]:
            common = sorted(set(table[a]) & set(table[b]))
            if len(common) >= 3:
                x = np.array([table[a][m] for m in common])
                y = np.array([table[b][m] for m in common])
                rows.append({"metric_a": a, "metric_b": b, "tau": kendall(x, y), "methods": len(common)})
    return rows


def evaluate(cfg, results: list[dict], per_image: dict) -> Evaluation:
    quality = _quality(cfg.metrics.known_order)
    known = _metric_rows(per_image, quality) + _retrain_rows(cfg.run_dir, quality) + _curve_rows(cfg.run_dir, quality)
    agreement = _agreement(results, set(quality))
    scored = [r for r in known if np.isfinite(r["tau"])]
    best = max(scored, key=lambda r: r["tau"]) if scored else None
    summary = {
        "measures": len(known),
        "recovering": [r["measure"] for r in known if r["recovers"]],
        "best": f"{best['measure']} (τ {best['tau']:.2f})" if best else None,
    }
    if not known:
        present = sorted({m for m, _ in per_image} & set(quality))
        summary["note"] = (
            f"the store holds {len(present)} of the known-order methods ({', '.join(present) or 'none'}); "
            f"extract methods of at least {MIN_TIERS} tiers of metrics.known_order to judge the metrics"
        )
    return Evaluation(known, agreement, summary)


# ------------------------------------------------------------------------------------------------ outputs


def _cell(value: float, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _ranks(results: list[dict]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(methods, metrics, values, ranks): rank 1 is the best method under each metric."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    metrics = list(dict.fromkeys(r["metric"] for r in results))
    values = np.full((len(methods), len(metrics)), np.nan)
    for r in results:
        values[methods.index(r["method"]), metrics.index(r["metric"])] = float(r["value"])
    ranks = np.full_like(values, np.nan)
    for j, metric in enumerate(metrics):
        sign = -1.0 if METRICS.get(metric).direction == "higher" else 1.0
        order = np.argsort(sign * values[:, j], kind="stable")
        ranks[order, j] = np.arange(1, len(methods) + 1)
    return methods, metrics, values, ranks


def plot_ranks(results: list[dict], path: Path) -> None:
    methods, metrics, values, ranks = _ranks(results)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(metrics), 1.0 + 0.4 * len(methods)))
    image = ax.imshow(ranks, cmap="viridis_r", aspect="auto", vmin=1, vmax=max(len(methods), 2))
    ax.set_xticks(range(len(metrics)), metrics, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    for i in range(len(methods)):
        for j in range(len(metrics)):
            ax.text(j, i, f"{int(ranks[i, j])}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(image, ax=ax, label="rank (1 = best under the metric)")
    ax.set_title("Methods ranked by each metric")
    fig.tight_layout()
    save_figure(fig, path)


def results_markdown(results: list[dict]) -> str:
    methods, metrics, values, ranks = _ranks(results)
    arrows = {m: "↑" if METRICS.get(m).direction == "higher" else "↓" for m in metrics}
    head = "| method | " + " | ".join(f"{m} {arrows[m]}" for m in metrics) + " |\n"
    head += "|---|" + "---:|" * len(metrics) + "\n"
    lines = [
        f"| {method} | " + " | ".join(f"{_cell(values[i, j])} ({int(ranks[i, j])})" for j in range(len(metrics))) + " |"
        for i, method in enumerate(methods)
    ]
    return head + "\n".join(lines) + "\n"


def meta_markdown(known: list[dict]) -> str:
    lines = [
        "| measure | family | τ with the known order | ± | samples | methods | recovers it (τ ≥ 0.8) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in sorted(known, key=lambda r: -(r["tau"] if np.isfinite(r["tau"]) else -9)):
        lines.append(
            f"| {r['measure']} | {r['family']} | {_cell(r['tau'], 2)} | {_cell(r['tau_std'], 2)} | {r['samples']} | "
            f"{len(r['methods'].split())} | {'yes' if r['recovers'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def write(out: Path, cfg, results: list[dict], evaluation: Evaluation, flagged: dict[str, float]) -> None:
    write_csv(out / "meta.csv", evaluation.known, META_COLUMNS + ["tau_of_means"])
    write_csv(out / "agreement.csv", evaluation.agreement, ["metric_a", "metric_b", "tau", "methods"])
    plot_ranks(results, out / "ranks.png")
    lines = [
        f"# Metrics: {cfg.name}\n",
        "Mean over the images of each metric (↑ higher is better, ↓ lower); in brackets the method's rank.",
        "",
        results_markdown(results),
        "![ranks](ranks.png)",
        "",
        "## Which measure recovers the known order",
        "",
        "Known order: " + " ≻ ".join(" = ".join(tier) for tier in cfg.metrics.known_order) + ".",
        "",
    ]
    if evaluation.known:
        lines.append(meta_markdown(evaluation.known))
    else:
        lines.append(evaluation.summary.get("note", ""))
    if flagged:
        lines += [
            "",
            "## Maps that barely change when the model is randomised",
            "",
            "Mean Spearman similarity to the original map after cascading randomisation of every layer (above "
            "0.5: the map does not depend on what the model learnt; model-free controls are expected here):",
            "",
            *[f"- {method}: {value:.2f}" for method, value in flagged.items()],
        ]
    if evaluation.agreement:
        lines += [
            "",
            "## Agreement between metrics on the other methods (Kendall τ)",
            "",
            "| metric | metric | τ | methods |",
            "|---|---|---:|---:|",
            *[
                f"| {r['metric_a']} | {r['metric_b']} | {_cell(r['tau'], 2)} | {r['methods']} |"
                for r in evaluation.agreement
            ],
        ]
    write_text_atomic(out / "summary.md", "\n".join(lines).rstrip() + "\n")
