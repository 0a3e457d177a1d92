"""Which method to trust: every measure's ranking of the methods, a consensus, and how far the
measures agree, with the findings stated in sentences computed from the numbers.

A *measure* is anything that scores every method once: a metric of ``roar metrics`` (its mean over
the images), ROAR or KAR accuracy at one threshold (mean over seeds), a curve area (MoRF, LeRF,
LeRF − MoRF per curves folder), read and named as the meta-evaluation reads them
(``roar.stages.meta``). Values are signed so that larger is better (ROAR: the accuracy negated, a
good map's removal hurts most; MoRF: the area under the curve, negated). The rankings cover the *real* methods: the
controls of ``metrics.known_order`` (the oracle, its degradations, random) exist to judge the
measures, and ranking them beside the methods would only restate their construction.

The consensus is the mean rank over the measures (Borda count); a second consensus takes only the
measures that recover the known order in the meta-evaluation (τ ≥ 0.8 in ``metrics/meta.csv``),
when it has run: the measures that earned trust.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from roar.core.tables import read_csv
from roar.stages.meta import RECOVERS, curve_values, kendall, retrain_values


@dataclass
class Measures:
    """values[measure][method], larger is better; ``family`` of each measure."""

    values: dict[str, dict[str, float]]
    family: dict[str, str]

    def methods(self) -> list[str]:
        return sorted({m for scores in self.values.values() for m in scores})


def collect(run_dir: Path, controls: set[str]) -> Measures:
    """Every measure of the run's results over the methods that are not ``controls``."""
    values: dict[str, dict[str, float]] = {}
    family: dict[str, str] = {}

    def add(measure: str, fam: str, method: str, value: float) -> None:
        if method not in controls and method != "unmodified" and math.isfinite(value):
            values.setdefault(measure, {})[method] = value
            family[measure] = fam

    for r in read_csv(run_dir / "metrics" / "results.csv"):
        sign = 1.0 if str(r["higher_is_better"]).lower() == "true" else -1.0
        add(r["metric"], "metrics", r["method"], sign * float(r["value"]))
    for measure, seeds in retrain_values(run_dir).items():
        for method in {m for per_seed in seeds.values() for m in per_seed}:
            add(measure, "retraining", method, float(np.mean([v[method] for v in seeds.values() if method in v])))
    for measure, areas in curve_values(run_dir).items():
        for method, area in areas.items():
            add(measure, "curves", method, area)
    keep = {m: v for m, v in values.items() if len(v) >= 3}  # a ranking of two says little
    return Measures(keep, {m: family[m] for m in keep})


def ranks(measures: Measures) -> tuple[list[str], list[str], np.ndarray]:
    """(methods, measures, ranks [methods, measures]): 1 = best; ties share their mean rank; NaN if unscored."""
    from scipy.stats import rankdata

    methods, names = measures.methods(), list(measures.values)
    out = np.full((len(methods), len(names)), np.nan)
    for j, name in enumerate(names):
        scored = [i for i, m in enumerate(methods) if m in measures.values[name]]
        values = np.array([measures.values[name][methods[i]] for i in scored])
        out[scored, j] = rankdata(-values, method="average")
    return methods, names, out


def trusted(run_dir: Path) -> dict[str, float]:
    """{measure: τ} of the measures that recover the known order (``metrics/meta.csv``)."""
    path = run_dir / "metrics" / "meta.csv"
    if not path.exists():
        return {}
    rows = read_csv(path)
    return {r["measure"]: float(r["tau"]) for r in rows if r["tau"] not in ("", None) and float(r["tau"]) >= RECOVERS}


def consensus(methods: list[str], names: list[str], rank: np.ndarray, chosen: set[str] | None = None) -> list[tuple]:
    """[(method, mean rank, measures)] best first, over ``chosen`` measures (default all)."""
    columns = [j for j, n in enumerate(names) if chosen is None or n in chosen]
    if not columns:
        return []
    sub = rank[:, columns]
    rows = [
        (m, float(np.nanmean(sub[i])), int(np.isfinite(sub[i]).sum()))
        for i, m in enumerate(methods)
        if np.isfinite(sub[i]).any()
    ]
    return sorted(rows, key=lambda r: (r[1], r[0]))


def tau_matrix(measures: Measures) -> tuple[list[str], np.ndarray]:
    """Kendall τ between every two measures' values over the methods both scored (NaN below 3)."""
    names = list(measures.values)
    out = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            common = sorted(set(measures.values[a]) & set(measures.values[b]))
            if len(common) >= 3:
                x = np.array([measures.values[a][m] for m in common])
                y = np.array([measures.values[b][m] for m in common])
                out[i, j] = 1.0 if i == j else kendall(x, y)
    return names, out


def _strength(tau: float) -> str:
    return "strongly" if tau >= 0.6 else "moderately" if tau >= 0.3 else "little" if tau >= 0 else "not at all"


def findings(measures: Measures, trusted_taus: dict[str, float], flagged: dict[str, float]) -> list[str]:
    """The section's sentences, every one computed from the numbers."""
    methods, names, rank = ranks(measures)
    if not names:
        return []
    out = []
    overall = consensus(methods, names, rank)
    lead = ", then ".join(f"**{m}** ({r:.1f})" for m, r, _ in overall[:3])
    out.append(
        f"Across {len(names)} measures of {len(methods)} methods, the mean rank (1 = best) puts {lead} first; "
        f"**{overall[-1][0]}** comes last ({overall[-1][1]:.1f})."
    )
    firsts = {m: int(np.sum(rank[i] == np.nanmin(rank, axis=0))) for i, m in enumerate(methods)}
    top = max(firsts, key=lambda m: (firsts[m], m == overall[0][0]))
    out.append(f"**{top}** is ranked first (or tied first) by {firsts[top]} of the {len(names)} measures.")
    chosen = set(trusted_taus) & set(names)
    if trusted_taus:
        if chosen:
            best = consensus(methods, names, rank, chosen)
            agree = (
                "as the overall consensus does"
                if best[0][0] == overall[0][0]
                else (f"where the overall consensus, **{overall[0][0]}**, rests on measures that do not")
            )
            out.append(
                f"The {len(chosen)} measures that recover the known order of the controls (τ ≥ {RECOVERS}), taken "
                f"alone, rank **{best[0][0]}** first (mean rank {best[0][1]:.1f}), {agree}."
            )
        else:
            out.append("None of the measures that score these methods recovers the known order of the controls.")
    labels, tau = tau_matrix(measures)
    pairs = [
        (tau[i, j], labels[i], labels[j])
        for i in range(len(labels))
        for j in range(i + 1, len(labels))
        if np.isfinite(tau[i, j])
    ]
    if pairs:
        median = float(np.median([p[0] for p in pairs]))
        hi, lo = max(pairs), min(pairs)
        out.append(
            f"The measures agree {_strength(median)} on the order of the methods: the median Kendall τ between "
            f"two measures' rankings is {median:.2f} over {len(pairs)} pairs, from {lo[0]:.2f} "
            f"({lo[1]} against {lo[2]}) to {hi[0]:.2f} ({hi[1]} against {hi[2]})."
        )
    for method, similarity in flagged.items():
        if method in methods:
            out.append(
                f"The maps of **{method}** barely change when every layer of the model is randomised (mean Spearman "
                f"{similarity:.2f}): they do not depend on what the model learnt."
            )
    return out
