"""The report's sections, each built from one stage's outputs in ``runs/<name>/``.

A section appears as soon as its stage's results exist; when they do not, the section says so
and names the command that produces them (``document.not_run``). Nothing here computes a result a
stage owns: tables come from the stages' CSV files, figures from their plot functions (redrawn as
SVG) or their PNG pictures.
"""

from __future__ import annotations

import json
from pathlib import Path

from roar.config import RunConfig
from roar.core.tables import read_csv
from roar.metrics import METRICS
from roar.stages.meta import curve_folders
from roar.stages.report import figures, trust
from roar.stages.report.document import Code, Section, Table, Text, fmt, not_run


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _percent(value) -> str:
    return "–" if value in (None, "") else f"{100 * float(value):.1f}%"


def csv_table(path: Path, caption: str = "", keep=None, scientific: tuple[str, ...] = ()) -> Table | None:
    """A stage's CSV as a table (the rows ``keep(row)`` accepts), numbers to 3 digits (the
    ``scientific`` columns, p-values, as 1.2e-17 when smaller); None when empty."""
    rows = [r for r in read_csv(path) if keep is None or keep(r)]
    if not rows:
        return None
    columns = list(rows[0])
    return Table(columns, [[fmt(_number(r.get(c)), 3, c in scientific) for c in columns] for r in rows], caption)


def _float(text) -> float | None:
    """A CSV cell as a float (an empty cell: None)."""
    return None if text in (None, "") else float(text)


def _number(text):
    """A CSV cell as int or float when it is one, else the text."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# ------------------------------------------------------------------------------------------------ run


def run_section(cfg: RunConfig, command: str) -> Section:
    train = cfg.run_dir / "train"
    summary = _json(train / "summary.json")
    if summary is None:
        return not_run("Run", command.format(stage="train"))
    ds, model = cfg.dataset, cfg.model
    facts = [
        [
            "dataset",
            f"`{ds.name}`" + (f", {ds.train_size} train / {ds.test_size} test" if hasattr(ds, "train_size") else ""),
        ],
        ["model", f"`{model.name}`" + (f", widths {list(model.widths)}" if getattr(model, "widths", None) else "")],
        ["test accuracy", _percent(summary.get("test_accuracy"))],
        ["epochs", fmt(summary.get("epochs"))],
        ["training time", f"{float(summary.get('seconds', 0)):.0f} s on {summary.get('device', '?')}"],
    ]
    blocks: list = [Table(["", "value"], facts)]
    history = (
        [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if (train / "metrics.jsonl").exists()
        else []
    )
    if history:
        blocks.append(figures.svg("training", figures.plot_training, history, caption="Training curves."))
    times = [(folder.name, seconds) for folder, seconds in stage_seconds(cfg.run_dir)]
    if times:
        blocks.append(
            Table(
                [name for name, _ in times],
                [[f"{seconds:.0f} s" for _, seconds in times]],
                "Time of each stage's last run (a rerun that reuses its results is quick).",
            )
        )
    return Section("Run", blocks)


PIPELINE = ["train", "patterns", "attributions", "retrain", "curves", "vog", "insecurity", "metrics"]


def _stage_folders(run_dir: Path) -> list[Path]:
    """The run's stage folders in pipeline order (other folders, extra curve protocols, after)."""
    folders = [p for p in run_dir.iterdir() if p.is_dir() and p.name != "report"]
    rank = {name: i for i, name in enumerate(PIPELINE)}
    return sorted(folders, key=lambda p: (rank.get(p.name, len(PIPELINE)), p.name))


def stage_seconds(run_dir: Path) -> list[tuple[Path, float]]:
    """(stage folder, seconds of its last run) for every stage folder whose summary records a time."""
    out = []
    for folder in _stage_folders(run_dir):
        seconds = (_json(folder / "summary.json") or {}).get("seconds")
        if isinstance(seconds, (int, float)):
            out.append((folder, float(seconds)))
    return out


# ------------------------------------------------------------------------------------------------ ROAR / KAR


def retrain_section(cfg: RunConfig, command: str, classes: int | None = None) -> Section:
    from roar.stages.retrain.summary import aggregate, plot_accuracy

    out = cfg.run_dir / "retrain"
    rows = read_csv(out / "results.csv")
    if not rows:
        return not_run("ROAR and KAR", command.format(stage="retrain"))
    table = aggregate(rows)
    blocks: list = [
        Text(
            "Test accuracy of a model retrained on images whose top t% pixels (by each method's map) were removed "
            "(ROAR: a good map's removal hurts most, lower is better) or kept (KAR: higher is better), mean ± std "
            f"over seeds; fill `{cfg.retrain.fill.name}`. The leakage panel trains on the removal mask alone: "
            "accuracy above chance there means the mask's shape tells the class."
        ),
        figures.svg("retrain", plot_accuracy, table, num_classes=classes, caption="Accuracy against threshold."),
    ]
    baseline = next((r for r in table if r["mode"] == "baseline"), None)
    if baseline:
        blocks.append(
            Text(
                f"Unmodified model: {100 * baseline['mean']:.1f} ± {100 * baseline['std']:.1f}% (n = {baseline['n']})."
            )
        )
    for mode, title in (("roar", "ROAR"), ("kar", "KAR"), ("leak", "Leakage")):
        chosen = [r for r in table if r["mode"] == mode]
        if not chosen:
            continue
        thresholds = sorted({r["threshold"] for r in chosen})
        cells = {(r["method"], r["threshold"]): r for r in chosen}
        body = [
            [
                method,
                *(_accuracy(cells.get((method, t))) for t in thresholds),
            ]
            for method in sorted({r["method"] for r in chosen})
        ]
        seeds = sorted({r["n"] for r in chosen})
        counted = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
        caption = f"{title}: test accuracy (%), mean ± std over {counted} seed(s)."
        blocks.append(Table(["method", *(f"{t:g}%" for t in thresholds)], body, caption))
    return Section("ROAR and KAR", blocks)


def _accuracy(cell: dict | None) -> str:
    """Mean ± std in %, the std only where there is more than one seed."""
    if cell is None:
        return "–"
    text = f"{100 * cell['mean']:.1f}"
    return text + (f" ± {100 * cell['std']:.1f}" if cell["n"] > 1 else "")


# ------------------------------------------------------------------------------------------------ curves


def curves_section(cfg: RunConfig, command: str) -> Section:
    from roar.metrics.curves import curve_measures
    from roar.stages.curves import plot_curves

    folders = curve_folders(cfg.run_dir)
    if not folders:
        return not_run("Perturbation curves", command.format(stage="curves"))
    section = Section(
        "Perturbation curves",
        [
            Text(
                "Accuracy of the trained model as the most (MoRF) or least (LeRF) relevant pixels are replaced, "
                "without retraining; areas under the curves by the trapezoid rule. A map that finds what the model "
                "uses has a low MoRF area and a high LeRF − MoRF."
            )
        ],
    )
    measures = curve_measures()
    for folder in folders:
        results = read_csv(folder / "results.csv")
        settings = results[0] if results else {}
        blocks: list = []
        if results:
            blocks.append(figures.svg(f"curves_{folder.name}", plot_curves, results, measures=measures))
        areas = read_csv(folder / "summary.csv")
        for measure in measures:
            blocks.append(_area_table(areas, measure, settings))
        section.subsections.append(Section(f"{folder.name}: fill {settings.get('fill', '?')}", blocks))
    return section


def _area_table(areas: list[dict], measure, settings: dict) -> Table:
    """One measure's areas per method: MoRF, LeRF, LeRF − MoRF; the random order's single curve."""
    rows = []
    for r in areas:
        if r.get(f"{measure.name}_random"):
            rows.append([f"{r['method']} (no map)", fmt(_number(r[f"{measure.name}_random"])), "–", "–"])
        else:
            keys = ("morf", "lerf", "lerf_minus_morf")
            rows.append([r["method"], *(fmt(_number(r.get(f"{measure.name}_{k}"))) for k in keys)])
    better = f"MoRF {measure.direction_of('morf')}, LeRF − MoRF {measure.direction_of('lerf_minus_morf')} is better"
    caption = (
        f"{measure.title}: area under the curve ({better}; granularity {settings.get('granularity', '?')}, "
        f"fill {settings.get('fill', '?')})."
    )
    return Table(["method", "MoRF", "LeRF", "LeRF − MoRF"], rows, caption)


# ------------------------------------------------------------------------------------------------ metrics


def metrics_section(cfg: RunConfig, command: str) -> Section:
    from roar.stages.meta import plot_ranks

    out = cfg.run_dir / "metrics"
    results = read_csv(out / "results.csv")
    if not results:
        return not_run("Metrics", command.format(stage="metrics"))
    for r in results:
        r["value"] = float(r["value"])
    methods = list(dict.fromkeys(r["method"] for r in results))
    metrics = list(dict.fromkeys(r["metric"] for r in results))
    values = {(r["method"], r["metric"]): r["value"] for r in results}
    arrows = {m: "↑" if METRICS.get(m).direction == "higher" else "↓" for m in metrics}
    blocks: list = [
        Text(f"Mean over {results[0]['images']} test images of each metric (↑ higher is better, ↓ lower)."),
        figures.svg("metrics_ranks", plot_ranks, results, caption="Methods ranked by each metric (1 = best)."),
        Table(
            ["method", *(f"{m} {arrows[m]}" for m in metrics)],
            [[method, *(fmt(values.get((method, m))) for m in metrics)] for method in methods],
        ),
    ]
    meta = read_csv(out / "meta.csv")
    if meta:
        known = " ≻ ".join(" = ".join(tier) for tier in cfg.metrics.known_order)
        meta.sort(key=lambda r: -float(r["tau"]) if r["tau"] not in ("", None) else 9)
        blocks += [
            Text(
                f"**Which measure recovers the known order** {known}: τ over the pairs of controls whose order is "
                "known (1: every pair ranked right, −1: all reversed), mean ± std over images (metrics) or seeds "
                "(ROAR, KAR)."
            ),
            Table(
                ["measure", "family", "τ", "±", "samples", "recovers it"],
                [
                    [
                        r["measure"],
                        r["family"],
                        fmt(_float(r["tau"]), 2),
                        fmt(_float(r["tau_std"]), 2),
                        r["samples"],
                        "yes" if r["recovers"] == "True" else "no",
                    ]
                    for r in meta
                ],
            ),
        ]
    return Section("Metrics", blocks)


# ------------------------------------------------------------------------------------------------ trust


def trust_section(cfg: RunConfig, command: str) -> Section:
    controls = {m for tier in cfg.metrics.known_order for m in tier}
    measures = trust.collect(cfg.run_dir, controls)
    if not measures.values:
        return not_run(
            "Which method to trust", command.format(stage="metrics"), "no measure has scored three methods yet"
        )
    summary = _json(cfg.run_dir / "metrics" / "summary.json") or {}
    flagged = (summary.get("meta") or {}).get("barely_change") or {}
    sentences = trust.findings(measures, trust.trusted(cfg.run_dir), flagged)
    methods, names, rank = trust.ranks(measures)
    overall = trust.consensus(methods, names, rank)
    blocks: list = [Text(s) for s in sentences]
    order = [m for m, _, _ in overall]
    rows = [["mean rank", *(f"**{r:.1f}**" for _, r, _ in overall)]]
    rows += [[name, *(fmt(rank[methods.index(m), j], 1) for m in order)] for j, name in enumerate(names)]
    caption = (
        f"Rank of each method under each measure (1 = best), methods by their mean rank; the controls "
        f"{', '.join(sorted(controls))} are left out."
    )
    blocks.append(Table(["measure", *order], rows, caption))
    labels, tau = trust.tau_matrix(measures)
    if len(labels) >= 2:
        blocks.append(
            figures.svg(
                "trust_agreement",
                figures.plot_matrix,
                labels,
                tau,
                "Agreement between measures",
                caption="Kendall τ between the rankings two measures give the methods.",
            )
        )
    return Section("Which method to trust", blocks)


# ------------------------------------------------------------------------------------------------ difficulty


def difficulty_section(cfg: RunConfig, command: str) -> Section:
    subsections = [_vog(cfg, command), _vog_toy(cfg), _insecurity(cfg, command)]
    return Section("Example difficulty", subsections=[s for s in subsections if s is not None])


def _vog(cfg: RunConfig, command: str) -> Section:
    vog = cfg.run_dir / "vog"
    if not (vog / "scores.csv").exists():
        return not_run("VoG", command.format(stage="vog"))
    about = (
        "Variance of gradients over the training snapshots: error rate per VoG decile, how well each score flags "
        "the examples made hard (AUROC), how the scores correlate, and the per-class extremes."
    )
    blocks: list = [Text(about)]
    if (vog / "deciles.png").exists():
        blocks.append(figures.png_file("vog_deciles", vog / "deciles.png", "Error rate per VoG decile."))
    split = (_json(vog / "summary.json") or {}).get("analysed_split", "test")
    auroc = csv_table(
        vog / "auroc.csv",
        f"AUROC of each score for each kind of difficulty ({split} split; VoG over all snapshots).",
        keep=lambda r: r["split"] == split and r.get("stage") in ("complete", "", None),
    )
    correlations = csv_table(
        vog / "correlations.csv",
        f"Spearman correlation between the scores ({split} split).",
        keep=lambda r: r["split"] == split,
        scientific=("p",),
    )
    blocks += [t for t in (auroc, correlations) if t is not None]
    grids = sorted((vog / "grids").glob("*.png")) if (vog / "grids").is_dir() else []
    blocks += [figures.png_file(f"vog_grid_{g.stem}", g, f"Lowest and highest VoG: {g.stem}.") for g in grids]
    return Section("VoG", blocks)


def _vog_toy(cfg: RunConfig) -> Section | None:
    """The toy experiment's figures when ``roar vog-toy`` wrote them beside the run (``runs/vog_toy``)."""
    toy = cfg.run_dir.parent / "vog_toy"
    summary = _json(toy / "summary.json")
    if summary is None:
        return None
    rho = summary.get("spearman_rho")
    about = "VoG against each point's distance to the decision boundary" + (
        f": Spearman ρ = {float(rho):.3f}." if rho is not None else "."
    )
    pictures = [toy / f"{name}.png" for name in ("boundary", "vog_vs_distance")]
    return Section(
        "VoG on 2-D blobs",
        [Text(about), *(figures.png_file(f"vog_toy_{p.stem}", p) for p in pictures if p.exists())],
    )


def _insecurity(cfg: RunConfig, command: str) -> Section:
    out = cfg.run_dir / "insecurity"
    if not (out / "summary.json").exists():
        return not_run("Insecurity maps", command.format(stage="insecurity"))
    about = (
        "Where the model hesitates between two classes: precision-recall area of each difficulty score and "
        "variant against the evidence regions of the ambiguous pair (higher is better; map: the insecurity map, "
        "the difficulty map alone, or the baselines)."
    )
    blocks: list = [Text(about)]
    areas = read_csv(out / "areas.csv")
    if areas:
        blocks.append(_area_pivot(areas))
    pictures = [out / f"{name}.png" for name in ("pr", "examples")]
    blocks += [figures.png_file(f"insecurity_{p.stem}", p) for p in pictures if p.exists()]
    return Section("Insecurity maps", blocks)


def _area_pivot(areas: list[dict]) -> Table:
    """Scores × variants: the insecurity map's area, the difficulty map's alone in brackets; then the
    baselines (the top class's map, a random map) per variant."""
    variants = list(dict.fromkeys(r["variant"] for r in areas))
    cell = {(r["score"], r["variant"], r["map"]): float(r["area"]) for r in areas}
    rows = []
    for score in dict.fromkeys(r["score"] for r in areas if r["score"]):
        rows.append(
            [
                score,
                *(
                    f"{fmt(cell.get((score, v, 'insecurity')))} ({fmt(cell.get((score, v, 'difficulty')))})"
                    for v in variants
                ),
            ]
        )
    for name, label in (("class_map", "top class map alone"), ("random", "random map")):
        if any(r["map"] == name for r in areas):
            rows.append([label, *(fmt(cell.get(("", v, name))) for v in variants)])
    maps = areas[0].get("maps", "?")
    caption = f"Area under the precision-recall curve ({maps} image-pair maps); in brackets the difficulty map alone."
    return Table(["score", *variants], rows, caption)


# ------------------------------------------------------------------------------------------------ provenance


def provenance_section(cfg: RunConfig, command: str, resolved: str) -> Section:
    """Where every result came from: each stage's ``provenance.json`` (when it last ran, with which
    code, on which device, from which inputs), the software, and the resolved configuration."""
    rows, software = [], {}
    for folder in _stage_folders(cfg.run_dir):
        info = _json(folder / "provenance.json")
        if info is None:
            continue
        seconds = (_json(folder / "summary.json") or {}).get("seconds")
        inputs = info.get("inputs") or {}
        fingerprints = ", ".join(f"{k} `{str(v)[:12]}`" for k, v in inputs.items() if isinstance(v, str))
        rows.append(
            [
                folder.name,
                str(info.get("started", "–")),
                "–" if seconds is None else f"{float(seconds):.0f} s",
                str(info.get("git_commit") or "–")[:12],
                str(info.get("cuda") or info.get("device") or "–"),
                fingerprints or "–",
            ]
        )
        software = software or {k: info.get(k) for k in ("roar_version", "python", "torch", "platform")}
    blocks: list = [
        Table(["", "value"], [["seed", str(cfg.seed)], *([k, str(v)] for k, v in software.items() if v)]),
        Table(
            ["stage", "started", "time", "commit", "device", "inputs"],
            rows,
            "Each stage's last run, from its provenance.json; the inputs are the fingerprints it was computed from.",
        ),
        Text("The resolved configuration of this report:"),
        Code(resolved.rstrip(), "yaml"),
    ]
    return Section("Provenance", blocks)
