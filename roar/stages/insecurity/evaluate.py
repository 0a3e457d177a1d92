"""How well a run's insecurity maps find the ambiguity, and the files that say so.

Every (image, ambiguous pair) is one map, scored against the region that carries evidence for that
pair (``ImageSplit.pair_evidence``: on the built-in data, the objects of either class). Each map is
binarised at its top-r fraction of pixels for every r of the grid; precision and recall are
averaged over the maps, and the area under the mean precision-recall curve is the table's number
(``roar.insecurity.evaluation``). Beside the insecurity maps of each score × variant, three
baselines are scored against the same pairs' regions: the difficulty map alone, the class map of
the top class alone, and a random map; an insecurity map earns its product only by beating them.

Pair matching, on images built from two known classes (``other_labels``): how often the pair
(label, other label) is one of the image's ambiguities, how often it is the strongest one (the
largest total insecurity), and, for reference, how often it is simply the classifier's top two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from roar.core.atomic import write_text_atomic
from roar.core.plots import pyplot, save_figure
from roar.core.provenance import write_json
from roar.core.tables import write_csv
from roar.data import Dataset, ImageSplit
from roar.insecurity.ambiguity import pair_classes, rank_pairs, strongest_slot, upsample
from roar.insecurity.evaluation import DEFAULT_FRACTIONS, pr_area, precision_recall
from roar.stages.insecurity.store import class_variant, set_name
from roar.store import MapStore

BASELINES = {"difficulty": "difficulty map alone", "class_map": "top class map alone", "random": "random map"}


@dataclass
class Results:
    curves: list[dict] = field(default_factory=list)  # results.csv: one row per map kind and fraction
    areas: list[dict] = field(default_factory=list)  # areas.csv: one row per map kind
    matches: list[dict] = field(default_factory=list)  # pair match rates
    examples: list[dict] = field(default_factory=list)  # images for the example grid
    summary: dict = field(default_factory=dict)


MAP_BUDGET = 1 << 24
"""Pixels of image-size maps scored at once (64 MB of float32): evaluation memory stays bounded
whatever the number of images and pairs."""


def _regions(split: ImageSplit, rows: np.ndarray, classes: np.ndarray, chosen: np.ndarray) -> torch.Tensor:
    """bool [M, H, W]: the evidence region of every chosen (image, slot)."""
    found: dict = {}
    out = []
    for i, slot in chosen:
        a, b = (int(c) for c in classes[i, slot])
        key = (int(rows[i]), min(a, b), max(a, b))
        if key not in found:
            found[key] = split.pair_evidence(key[0], a, b)
        out.append(found[key])
    return torch.stack(out)


def _summarise(precision: torch.Tensor, recall: torch.Tensor, fractions) -> dict:
    """Mean curves over the maps whose region is not empty, their area, and how many maps counted."""
    valid = ~torch.isnan(recall[:, 0])
    return {
        "precision": precision[valid].mean(0).tolist() if valid.any() else [float("nan")] * len(fractions),
        "recall": recall[valid].mean(0).tolist() if valid.any() else [float("nan")] * len(fractions),
        "area": pr_area(precision, recall),
        "maps": int(valid.sum()),
    }


def _add(results: Results, score: str, variant: str, kind: str, scored: dict, fractions) -> None:
    base = {"score": score, "variant": variant, "map": kind}
    results.areas.append({**base, "area": scored["area"], "maps": scored["maps"]})
    for r, p, q in zip(fractions, scored["precision"], scored["recall"]):
        results.curves.append({**base, "fraction": r, "precision": p, "recall": q, "maps": scored["maps"]})


def _score_class_variant(results: Results, cfg, split, stored, rows, classes, found, cv: str, noise) -> None:
    """Curves and areas of every map kind over the ambiguities of one class variant, chunk by chunk."""
    ic = cfg.insecurity
    fractions = list(ic.fractions or DEFAULT_FRACTIONS)
    p = len(rank_pairs(ic.top))
    size = tuple(split.geometry[1:])
    chosen = np.argwhere(found)  # (image, slot) of every ambiguity
    if not len(chosen):
        return
    variants = [v for v in ic.variants if class_variant(v) == cv]
    first = stored[set_name(ic.scores[0], variants[0])]
    kinds = {("", cv, "class_map"): lambda part: first[part[:, 0], p + 1], ("", cv, "random"): None}
    for v in variants:
        for s in ic.scores:
            maps = stored[set_name(s, v)]
            kinds[(s, v, "insecurity")] = lambda part, maps=maps: maps[part[:, 0], part[:, 1]]
            kinds[(s, v, "difficulty")] = lambda part, maps=maps: maps[part[:, 0], p]
    curves: dict[tuple, list] = {kind: [] for kind in kinds}
    step = max(1, MAP_BUDGET // (size[0] * size[1]))
    for start in range(0, len(chosen), step):
        part = chosen[start : start + step]
        regions = _regions(split, rows, classes, part)
        index = torch.as_tensor(rows[part[:, 0]] * p + part[:, 1])
        for kind, read in kinds.items():
            maps = (
                torch.rand((len(part), *size), generator=noise)
                if read is None
                else upsample(torch.as_tensor(read(part)), size)
            )
            curves[kind].append(precision_recall(maps, regions, fractions, indices=index, seed=cfg.seed))
    for (s, v, kind), parts in curves.items():
        precision, recall = (torch.cat([part[i] for part in parts]) for i in (0, 1))
        _add(results, s, v, kind, _summarise(precision, recall, fractions), fractions)


def evaluate(store: MapStore, cfg, dataset: Dataset, split: ImageSplit, ground_truth: bool) -> Results:
    ic = cfg.insecurity
    rows = store.indices
    top = torch.as_tensor(store.extra("top"))
    classes = pair_classes(top).numpy()  # [n, P, 2]
    results = Results()
    class_variants = sorted({class_variant(v) for v in ic.variants})
    pairs = {cv: store.extra(f"pairs.{cv}") for cv in class_variants}
    stored = {set_name(s, v): store.read(set_name(s, v)) for s in ic.scores for v in ic.variants}
    if ground_truth:
        noise = torch.Generator().manual_seed(cfg.seed)
        for cv in class_variants:
            _score_class_variant(results, cfg, split, stored, rows, classes, pairs[cv], cv, noise)
    results.matches = _matches(store, cfg, split, rows, top, classes, pairs)
    results.examples = _examples(store, cfg, dataset, split, rows, classes, pairs, stored, results)
    results.summary = _summary(results, ic, ground_truth, pairs)
    return results


def _strongest(totals: np.ndarray, found: np.ndarray) -> np.ndarray:
    """The slot with the largest total insecurity among the image's ambiguities, -1 for none."""
    return strongest_slot(torch.as_tensor(totals), torch.as_tensor(found)).numpy()


def _matches(store, cfg, split, rows, top, classes, pairs) -> list[dict]:
    """Pair match rates over the images built from two known classes (none without ``other_labels``)."""
    ic = cfg.insecurity
    if split.other_labels is None:
        return []
    other = split.other_labels.numpy()[rows]
    label = split.labels.numpy()[rows]
    two = other >= 0
    if not two.any():
        return []
    lo, hi = np.minimum(label, other)[:, None], np.maximum(label, other)[:, None]
    same = (classes.min(2) == lo) & (classes.max(2) == hi)  # [n, P]: the slot is the pair (label, other)
    top2 = np.sort(top[:, :2].numpy(), axis=1)
    out = [
        {
            "score": "",
            "variant": "",
            "match": "top two classes",
            "rate": float((top2 == np.hstack([lo, hi]))[two].all(1).mean()),
            "images": int(two.sum()),
        }
    ]
    for cv, found in pairs.items():
        out.append(
            {
                "score": "",
                "variant": cv,
                "match": "an ambiguity",
                "rate": float((same & found)[two].any(1).mean()),
                "images": int(two.sum()),
            }
        )
    for s in ic.scores:
        for v in ic.variants:
            found = pairs[class_variant(v)]
            best = _strongest(store.extra(f"totals.{set_name(s, v)}"), found)
            hit = (best >= 0) & same[np.arange(len(best)), best.clip(min=0)]
            out.append(
                {
                    "score": s,
                    "variant": v,
                    "match": "the strongest ambiguity",
                    "rate": float(hit[two].mean()),
                    "images": int(two.sum()),
                }
            )
    return out


def _best(results: Results, ic) -> tuple[str, str]:
    scored = [a for a in results.areas if a["map"] == "insecurity" and np.isfinite(a["area"])]
    if not scored:
        return ic.scores[-1], ic.variants[-1]
    best = max(scored, key=lambda a: a["area"])
    return best["score"], best["variant"]


def _examples(store, cfg, dataset, split, rows, classes, pairs, stored, results) -> list[dict]:
    """The first images with an ambiguity (two-object ones first) under the best setting: the map of
    the pair the image was built from (when it is an ambiguity) and of the strongest pair."""
    ic = cfg.insecurity
    if not ic.examples:
        return []
    s, v = _best(results, ic)
    found = pairs[class_variant(v)]
    best = _strongest(store.extra(f"totals.{set_name(s, v)}"), found)
    others = split.other_labels.numpy()[rows] if split.other_labels is not None else np.full(len(rows), -1)
    order = np.flatnonzero(best >= 0)
    order = order[np.argsort(others[order] < 0, kind="stable")]
    names = dataset.class_names
    size = tuple(split.geometry[1:])
    out = []
    for i in order[: ic.examples]:
        label, other = int(split.labels[rows[i]]), int(others[i])
        built = [k for k in np.flatnonzero(found[i]) if sorted(classes[i, k]) == sorted((label, other))]

        def region(a: int, b: int, i=i):
            found = split.pair_evidence(int(rows[i]), a, b)
            return None if found is None else found.numpy()

        def full(slot: int, i=i) -> np.ndarray:
            return upsample(torch.as_tensor(stored[set_name(s, v)][i, slot]), size).numpy()

        a, b = (int(c) for c in classes[i, best[i]])
        out.append(
            {
                "image": split.read([int(rows[i])])[0].permute(1, 2, 0).numpy(),
                "truth": names[label] + (f" + {names[other]}" if other >= 0 else ""),
                "region": region(label, other) if other >= 0 else region(a, b),
                "built": full(built[0]) if built else None,
                "strongest": full(best[i]),
                "pair": f"{names[a]} / {names[b]}",
                "setting": set_name(s, v),
            }
        )
    return out


def _summary(results: Results, ic, ground_truth: bool, pairs) -> dict:
    areas = {f"{a['map']}:{a['score']}.{a['variant']}".replace(":.", ":"): a["area"] for a in results.areas}
    s, v = _best(results, ic)
    return {
        "ground_truth": ground_truth,
        "pairs_per_image": {cv: float(found.sum(1).mean()) for cv, found in pairs.items()},
        "areas": areas,
        "best": set_name(s, v) if ground_truth and results.areas else None,
        "matches": results.matches,
    }


# ------------------------------------------------------------------------------------------------ outputs


def _cell(value: float) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.3f}"


def comparison_markdown(results: Results, ic) -> str:
    """The paper's table: score × variant → PR area of the insecurity maps (difficulty alone in brackets)."""
    area = {(a["map"], a["score"], a["variant"]): a["area"] for a in results.areas}
    head = "| score | " + " | ".join(ic.variants) + " |\n|---|" + "---:|" * len(ic.variants) + "\n"
    lines = [
        f"| {s} | "
        + " | ".join(
            f"{_cell(area.get(('insecurity', s, v)))} ({_cell(area.get(('difficulty', s, v)))})" for v in ic.variants
        )
        + " |"
        for s in ic.scores
    ]
    for kind in ("class_map", "random"):
        lines.append(
            f"| *{BASELINES[kind]}* | "
            + " | ".join(_cell(area.get((kind, "", class_variant(v)))) for v in ic.variants)
            + " |"
        )
    return head + "\n".join(lines) + "\n"


def matches_markdown(matches: list[dict]) -> str:
    if not matches:
        return ""
    lines = ["| score | variant | the pair (label, other label) is … | images | rate |", "|---|---|---|---:|---:|"]
    lines += [
        f"| {m['score'] or '–'} | {m['variant'] or '–'} | {m['match']} | {m['images']} | {100 * m['rate']:.1f}% |"
        for m in matches
    ]
    return "\n".join(lines) + "\n"


def hardness_markdown(report: dict | None) -> str:
    if not report:
        return ""
    auroc, corr = report["auroc_error"], report["correlation_target"]
    lines = [
        f"Hardness predictor: {report['folds']} cross-fitted folds over {report['images']} images "
        f"({report['errors']} classifier errors); each image scored by the fold that did not see it.",
        "",
        "| score | AUROC for the classifier's errors | correlation with 1 − p(true class) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {_cell(auroc[name])} | {_cell(corr[name])} |" for name in auroc]
    return "\n".join(lines) + "\n"


def plot_pr(results: Results, ic, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ic.variants), figsize=(4.2 * len(ic.variants), 3.8), squeeze=False, sharey=True)
    colours = dict(zip(ic.scores, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    curves: dict[tuple, list] = {}
    for row in results.curves:
        curves.setdefault((row["map"], row["score"], row["variant"]), []).append(row)
    for ax, v in zip(axes[0], ic.variants):
        for s in ic.scores:
            for kind, style in (("insecurity", "-"), ("difficulty", ":")):
                pts = curves.get((kind, s, v), [])
                label = f"{s}" if kind == "insecurity" else f"{s}: D alone"
                ax.plot([r["recall"] for r in pts], [r["precision"] for r in pts], style, color=colours[s], label=label)
        for kind, style, colour in (("class_map", "--", "grey"), ("random", "-.", "black")):
            pts = curves.get((kind, "", class_variant(v)), [])
            ax.plot(
                [r["recall"] for r in pts], [r["precision"] for r in pts], style, color=colour, label=BASELINES[kind]
            )
        ax.set_title(f"variant: {v}")
        ax.set_xlabel("recall")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("precision")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Insecurity maps against the evidence region of each ambiguous pair")
    fig.tight_layout()
    save_figure(fig, path)


def plot_examples(examples: list[dict], path: Path) -> None:
    """One column per image: the image with its evidence region, the built pair's insecurity map,
    the strongest pair's."""
    plt = pyplot()
    n = len(examples)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 6.6), squeeze=False)
    for j, ex in enumerate(examples):
        image_ax, built_ax, strongest_ax = axes[0][j], axes[1][j], axes[2][j]
        image_ax.imshow(ex["image"], interpolation="nearest")
        if ex["region"] is not None and ex["region"].any():
            image_ax.contour(ex["region"], levels=[0.5], colors="yellow", linewidths=0.8)
        image_ax.set_title(ex["truth"], fontsize=7)
        for ax, key, title in ((built_ax, "built", "built pair"), (strongest_ax, "strongest", ex["pair"])):
            ax.imshow(ex["image"], interpolation="nearest")
            if ex[key] is not None:
                ax.imshow(ex[key], cmap="jet", alpha=0.55, interpolation="bilinear")
            ax.set_title(title if ex[key] is not None else "built pair: no ambiguity", fontsize=7)
        for ax in (image_ax, built_ax, strongest_ax):
            ax.set_xticks([])
            ax.set_yticks([])
    if examples:
        fig.suptitle(
            f"{examples[0]['setting']}: image with the evidence region of its classes (top), insecurity map of the "
            "pair it was built from (middle) and of the strongest pair (bottom)",
            fontsize=8,
        )
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(out: Path, cfg, dataset, split, results: Results, summary: dict) -> None:
    ic = cfg.insecurity
    for stale in ("results.csv", "areas.csv", "pr.png", "examples.png"):
        (out / stale).unlink(missing_ok=True)
    if results.curves:
        write_csv(out / "results.csv", results.curves)
        write_csv(out / "areas.csv", results.areas)
        plot_pr(results, ic, out / "pr.png")
    if results.examples:
        plot_examples(results.examples, out / "examples.png")
    write_json(out / "summary.json", summary)
    lines = [
        f"# Insecurity maps: {cfg.name}\n",
        f"- Images: {summary['images']} {summary['selection']} images of the {ic.split} split ({dataset.name}); "
        f"layer `{summary['layer']}`; "
        f"top {ic.top} classes, {ic.per_location} per location; ambiguous pairs per image: "
        + ", ".join(f"{cv} {n:.2f}" for cv, n in summary["pairs_per_image"].items())
        + ".",
    ]
    if results.curves:
        lines += [
            "",
            "## Precision-recall area against the evidence region of each pair",
            "",
            "Insecurity map of each score × variant; in brackets the difficulty map alone. Higher is better.",
            "",
            comparison_markdown(results, ic),
            "![precision-recall](pr.png)",
        ]
    else:
        lines += ["", f"No evaluation: dataset '{dataset.name}' has no ground truth for class pairs."]
    if results.matches:
        lines += ["", "## Is the pair the image was built from found?", "", matches_markdown(results.matches)]
    if summary.get("hardness"):
        lines += ["", "## Difficulty scores", "", hardness_markdown(summary["hardness"])]
    if results.examples:
        lines += ["", "## Examples", "", "![examples](examples.png)"]
    lines += [
        "",
        f"Computed in {summary['seconds']:.0f} s ({summary['seconds_maps']:.0f} s for maps of "
        f"{summary['maps_computed']} images).",
    ]
    write_text_atomic(out / "summary.md", "\n".join(lines).rstrip() + "\n")


def summary_line(summary: dict, notes: list[str]) -> str:
    line = (
        f"insecurity maps of {summary['images']} {summary['selection']} images for {len(summary['scores'])} scores × "
        f"{len(summary['variants'])} variants in {summary['seconds']:.0f} s"
    )
    areas = summary["areas"]
    if summary.get("best"):
        best = summary["best"]
        line += f": best {best} (PR area {areas['insecurity:' + best]:.3f}"
        baselines = [(k.split(":")[0], v) for k, v in areas.items() if k.startswith(("class_map:", "random:"))]
        line += "".join(f"; {name.replace('_', ' ')} {value:.3f}" for name, value in baselines[:2]) + ")"
    found = [m for m in summary["matches"] if m["match"] == "an ambiguity"]
    if found:
        line += f"; the built pair is an ambiguity of {100 * found[0]['rate']:.0f}% of two-object images"
    line += f" -> {summary['output']}"
    return line + "".join(f"; {note}" for note in notes)
