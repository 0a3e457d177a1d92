"""``roar vog``: VoG and its peer scores for a trained run, with tables and figures.

1. Gradients of every snapshot for each split in ``vog.splits`` (``roar.stages.vog.gradients``), with
   the peer arrays from the same passes; resumable, and a rerun computes nothing already stored.
2. VoG per stage (``vog.stages`` or early / middle / late thirds, plus complete) streamed from
   the store, class-normalised within each split; the peer scores from the per-snapshot arrays.
3. Outputs in ``<run>/vog/``: ``scores.csv`` (one row per example, split and stage),
   ``deciles.csv|md|png``, ``grids/<class>.png``, ``auroc.csv|md`` (datasets with difficulty
   tags), ``correlations.csv|md`` (with peers), ``summary.md``, ``summary.json``, ``config.yaml``
   and ``provenance.json``.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np

from roar.config import RunConfig, VogConfig
from roar.core.atomic import replace_atomic, write_text_atomic
from roar.core.device import resolve_device
from roar.core.errors import RoarError
from roar.core.locks import output_folder
from roar.core.provenance import file_hash, record_run, write_json
from roar.core.tables import format_value, write_csv
from roar.data import TAGS, Dataset, ImageSplit, build_dataset
from roar.stages.result import StageResult
from roar.stages.train import load_run_model
from roar.stages.vog.gradients import (
    PeerPlan,
    Snapshot,
    check_snapshots,
    compute_split,
    find_snapshots,
    gradient_path,
    merge_shards,
    open_gradients,
    peer_cache,
    shard_rows,
    snapshot_dir,
)
from roar.store.shards import parse_shard, shard_paths
from roar.vog import analysis as A
from roar.vog.peers import GRAND, SNAPSHOT_KEYS, peer_scores
from roar.vog.scores import VARIANTS, default_stages, vog_scores, vog_variants

BASE_COLUMNS = ["index", "split", "label", "prediction", "correct", "stage", *VARIANTS]
SCORE_BUDGET = 64 * 2**20  # bytes of gradients (float64) that VoG scoring holds at once, whatever N is


def resolve_stages(stages: dict[str, list[int]] | None, k: int) -> dict[str, list[int]]:
    """The configured stages (checked against the K snapshots) or the default thirds; 'complete' last."""
    if stages is None:
        return default_stages(k)
    out = {}
    for name, positions in stages.items():
        if name == "complete":
            continue
        bad = [p for p in positions if not 0 <= p < k]
        if bad or not positions:
            problem = f"positions {bad} are outside 0..{k - 1}" if bad else "is empty"
            raise RoarError(f"vog.stages.{name}: {problem} (the run has {k} snapshots, numbered from 0)")
        out[name] = sorted(set(int(p) for p in positions))
    return {**out, "complete": list(range(k))}


def el2n_position(vc: VogConfig, stages: dict[str, list[int]], k: int) -> int:
    """Where EL2N (and GraNd) are taken: ``vog.el2n_snapshot``, else the last snapshot of the early
    stage (of the first stage when there is no 'early')."""
    if vc.el2n_snapshot is not None:
        position = vc.el2n_snapshot + (k if vc.el2n_snapshot < 0 else 0)
        if not 0 <= position < k:
            raise RoarError(f"vog.el2n_snapshot: {vc.el2n_snapshot} is outside the run's {k} snapshots")
        return position
    first = stages.get("early") or next(iter(stages.values()))
    return max(first)


# ---------------------------------------------------------------------------------------------- scores


def split_scores(
    cfg: RunConfig,
    split: ImageSplit,
    split_name: str,
    snapshots: list[Snapshot],
    stages: dict[str, list[int]],
    model_hash: str,
    el2n_at: int,
) -> dict:
    """Everything the analyses need about one split: rows, VoG per stage and variant, peer scores, tags."""
    with open_gradients(gradient_path(cfg, split_name)) as g:
        names = [s.name for s in snapshots]
        if g.snapshots != names:
            raise RoarError(f"{gradient_path(cfg, split_name)} holds snapshots {g.snapshots}, the run has {names}")
        labels, predictions, index = g.labels.copy(), g.predictions.copy(), g.indices.copy()
        raw = {stage: vog_scores(g, positions, budget_bytes=SCORE_BUDGET) for stage, positions in stages.items()}
    vog = {stage: vog_variants(scores, labels) for stage, scores in raw.items()}
    peers = None
    if cfg.vog.peers:
        cache = peer_cache(cfg, split_name, split, model_hash)
        change = cache.change()
        if change is not None:
            raise RoarError(
                f"peer scores of {split_name} in {cache.folder} are out of date ({change}); rerun 'roar vog'"
            )
        arrays = [cache.load(name, SNAPSHOT_KEYS) for name in names]
        if any(a is None for a in arrays):
            raise RoarError(f"peer scores of {split_name} are incomplete in {cache.folder}; rerun 'roar vog'")
        stacked = {key: np.stack([a[key] for a in arrays]) for key in SNAPSHOT_KEYS}
        grand = None
        if cfg.vog.grand:
            found = cache.load(names[el2n_at], (GRAND,))
            if found is None:
                raise RoarError(f"GraNd of {split_name} is missing in {cache.folder}; rerun 'roar vog'")
            grand = found[GRAND]
        peers = peer_scores(stacked, el2n_at, grand)
    return {
        "split": split_name,
        "labels": labels,
        "predictions": predictions,
        "correct": predictions == labels,
        "index": index,
        "vog": vog,
        "peers": peers,
        "tags": None if split.tags is None else split.tags.numpy(),
    }


def _columns(r: dict, stage: str, peers: list[str], tagged: bool) -> list[list[str]]:
    """The text of every column of one (split, stage) block, formatted a whole column at a time."""
    n = len(r["index"])

    def floats(values) -> list[str]:
        return [format_value(float(v)) for v in values]

    columns = [
        r["index"].astype(str).tolist(),
        [r["split"]] * n,
        r["labels"].astype(str).tolist(),
        r["predictions"].astype(str).tolist(),
        r["correct"].astype(int).astype(str).tolist(),
        [stage] * n,
        *(floats(r["vog"][stage][v]) for v in VARIANTS),
    ]
    for p in peers:
        values = r["peers"][p]
        columns.append(values.astype(np.int64).astype(str).tolist() if p == "forgetting" else floats(values))
    if tagged:
        columns.append([TAGS[int(t)] for t in r["tags"]])
    return columns


def write_scores(path: Path, results: list[dict]) -> None:
    """``scores.csv``: one row per (example, split, stage), peers and tag repeated on every stage row.

    Written block by block (one split and stage at a time) into a temporary file renamed into place:
    an ImageNet-sized split never holds millions of row objects in memory."""
    first = results[0]
    peers = list(first["peers"]) if first["peers"] is not None else []
    tagged = all(r["tags"] is not None for r in results)
    header = BASE_COLUMNS + peers + (["tag"] if tagged else [])

    def write(binary) -> None:
        text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
        out = csv.writer(text, lineterminator="\n")
        out.writerow(header)
        for r in results:
            for stage in r["vog"]:
                out.writerows(zip(*_columns(r, stage, peers, tagged)))
        text.flush()
        text.detach()  # leave the file open for replace_atomic to fsync

    replace_atomic(path, write)


# -------------------------------------------------------------------------------------------- analyses


def _image(split: ImageSplit, i: int) -> np.ndarray:
    return (split.images[i] if split.in_memory else split[i][0]).numpy()


def write_grids(out: Path, dataset: Dataset, split_name: str, r: dict, k: int, classes: int) -> int:
    """``grids/<class>.png`` for the first ``classes`` classes; returns how many were drawn."""
    split = dataset.split(split_name)
    scores = r["vog"]["complete"]["vog"]
    stems = A.file_names(dataset.class_names)
    for stale in (out / "grids").glob("*.png") if (out / "grids").is_dir() else []:
        stale.unlink()  # grids of an earlier run with other settings
    drawn = 0
    for c in range(min(classes, dataset.num_classes)):
        members = np.flatnonzero(r["labels"] == c)
        if not len(members):
            continue
        members = members[np.lexsort((r["index"][members], scores[members]))]
        count = min(k, len(members))

        def cell(i: int) -> tuple[np.ndarray, str, bool, float]:
            pred = int(r["predictions"][i])
            name = dataset.class_names[pred] if 0 <= pred < dataset.num_classes else "?"
            return _image(split, int(r["index"][i])), name, bool(r["correct"][i]), float(scores[i])

        low = [cell(i) for i in members[:count]]
        high = [cell(i) for i in members[::-1][:count]]
        title = (
            f"{dataset.class_names[c]}: the {count} lowest- and highest-VoG {split_name} images "
            "(complete stage); above each, the predicted label"
        )
        A.plot_grid(low, high, title, out / "grids" / f"{stems[c]}.png")
        drawn += 1
    return drawn


def _stage_text(stages: dict[str, list[int]], snapshots: list[Snapshot]) -> str:
    parts = []
    for name, positions in stages.items():
        first, last = snapshots[positions[0]].name, snapshots[positions[-1]].name
        span = first if first == last else f"{first} … {last}"
        parts.append(f"{name} = {span} ({len(positions)})")
    return "; ".join(parts)


def _drop_stale(out: Path, stem: str, written: bool) -> None:
    """Remove a table an earlier run wrote when this run does not write it (so no stale file remains)."""
    if not written:
        for suffix in (".csv", ".md"):
            (out / f"{stem}{suffix}").unlink(missing_ok=True)


def run(cfg: RunConfig, shard: str | None = None) -> StageResult:
    """``roar vog`` for a run: gradients, scores, tables and figures in ``<run>/vog``; returns a summary.

    Everything that can refuse the run (config, dataset, model, snapshots) is checked before the
    output folder's lock is taken and anything is written: a refused run changes nothing on disk.
    With ``shard`` ``"i/n"`` only the gradients of shard i are computed (``run_shard``).
    """
    index, count = parse_shard(shard)
    if count > 1:
        return run_shard(cfg, index, count)
    t0 = time.perf_counter()
    vc = cfg.vog
    device, dataset, model, model_path, snapshots, model_hash = _inputs(cfg)
    k = len(snapshots)
    stages = resolve_stages(vc.stages, k)
    el2n_at = el2n_position(vc, stages, k)
    with output_folder(cfg.run_dir / "vog") as out:
        return _write(cfg, t0, out, device, dataset, model, model_path, snapshots, stages, el2n_at, model_hash)


def _inputs(cfg: RunConfig):
    """(device, dataset, final model, its path, the snapshots in training order, the hash of them all),
    the snapshots checked to fit the model: everything that can refuse a run, before any write."""
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.dataset)
    model, _, model_path = load_run_model(cfg, dataset, device)
    snapshots = find_snapshots(snapshot_dir(cfg))
    check_snapshots(model, snapshots, model_path)
    return device, dataset, model, model_path, snapshots, file_hash(*[s.path for s in snapshots], model_path)


def run_shard(cfg: RunConfig, index: int, count: int) -> StageResult:
    """``roar vog --shard i/n``: the gradients of shard i's rows of every snapshot and split, into
    ``<split>.shard-<i>-of-<n>.h5``; the shard that finds all n finished merges them into ``<split>.h5``.
    The shards share the ``vog`` folder (a shared lock each); ``roar vog`` then scores in one process."""
    t0 = time.perf_counter()
    vc = cfg.vog
    device, dataset, model, model_path, snapshots, model_hash = _inputs(cfg)
    for split in vc.splits:
        shard_rows(cfg, dataset, split, (index, count))  # too many shards: refused before anything is written
        if gradient_path(cfg, split).exists():
            raise RoarError(
                f"{gradient_path(cfg, split)} exists: shards write a new gradient store; delete it to compute the "
                "gradients in shards, or run 'roar vog' in one process"
            )
    plan = PeerPlan(False)
    with output_folder(cfg.run_dir / "vog", shared=True) as out:
        computed = [
            compute_split(cfg, dataset, s, snapshots, model, model_path, model_hash, device, plan, shard=(index, count))
            for s in vc.splits
        ]
        merged = []
        last = all(p.exists() for s in vc.splits for p in shard_paths(gradient_path(cfg, s), count))
        if last:
            merged = [str(path) for path in merge_shards(cfg, count, again=False)]
        summary = {
            "shard": {"index": index, "count": count, "merged": merged},
            "splits": computed,
            "passes": sum(c["passes"] for c in computed),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_json(out / f"summary.shard-{index}-of-{count}.json", summary)
    rows = ", ".join(f"{c['split']} rows {c['rows'][0]}-{c['rows'][1]}" for c in computed)
    then = "gradients merged; run 'roar vog' for the scores" if last else "waiting for the other shards"
    line = (
        f"VoG gradients of {len(snapshots)} snapshots for {rows} ({summary['passes']} snapshot passes computed) "
        f"in {summary['seconds']:.0f} s (shard {index} of {count}; {then}) -> {out / 'gradients'}"
    )
    return StageResult(summary, line)


def _write(cfg, t0, out, device, dataset, model, model_path, snapshots, stages, el2n_at, model_hash) -> StageResult:
    """The stage's work once everything is checked, with ``out`` locked: gradients and peers, then
    scores, tables, figures, config and provenance."""
    vc = cfg.vog
    k = len(snapshots)
    plan = PeerPlan(vc.peers, el2n_at if vc.peers and vc.grand else None)
    computed = [
        compute_split(cfg, dataset, split, snapshots, model, model_path, model_hash, device, plan)
        for split in vc.splits
    ]
    t_gradients = time.perf_counter() - t0
    notes = []
    for c in computed:
        for what, key in (("gradients", "gradients_recomputed"), ("peer scores", "peers_recomputed")):
            if c.get(key):
                notes.append(f"{what} of {c['split']} recomputed: {c[key]}")

    results = [split_scores(cfg, dataset.split(s), s, snapshots, stages, model_hash, el2n_at) for s in vc.splits]
    record_run(out, cfg, {"dataset": dataset.fingerprint(), "snapshots_and_model": model_hash}, device)
    write_scores(out / "scores.csv", results)
    main = next((r for r in results if r["split"] == "test"), results[0])
    complete = main["vog"]["complete"]
    deciles = A.decile_table(complete, main["correct"], main["index"])
    write_csv(out / "deciles.csv", deciles)
    write_text_atomic(out / "deciles.md", A.deciles_markdown(deciles, main["split"], "complete"))
    overall = float(1 - main["correct"].mean())
    A.plot_deciles(deciles, overall, out / "deciles.png", main["split"], "complete")
    grids = write_grids(out, dataset, main["split"], main, vc.grid_k, vc.grid_classes)

    tag_names = list(dataset.info.get("tags", TAGS))
    aurocs = []
    for r in results:
        if r["tags"] is None or not (r["tags"] != 0).any():
            continue
        scores = {(v, stage): values[v] for stage, values in r["vog"].items() for v in VARIANTS}
        scores.update({(p, ""): values for p, values in (r["peers"] or {}).items()})
        scores[("final_error", "")] = (~r["correct"]).astype(np.float64)
        aurocs += A.auroc_table(scores, r["tags"], tag_names, r["split"])
    _drop_stale(out, "auroc", bool(aurocs))
    if aurocs:
        write_csv(out / "auroc.csv", aurocs)
        write_text_atomic(out / "auroc.md", A.auroc_markdown(aurocs, tag_names))
    correlations = []
    for r in results:
        if r["peers"] is not None:
            correlations += A.correlation_table(r["vog"]["complete"], r["peers"], r["split"])
    _drop_stale(out, "correlations", bool(correlations))
    if correlations:
        write_csv(out / "correlations.csv", correlations)
        write_text_atomic(out / "correlations.md", A.correlations_markdown(correlations))

    by_decile = {row["decile"]: row for row in deciles if row["score"] == "vog"}
    key = (main["split"], "vog", "complete")
    auroc_vog = next((a["auroc"] for a in aurocs if (a["split"], a["score"], a["stage"]) == key), None)
    summary = {
        "snapshots": k,
        "splits": [
            {"split": c["split"], "images": c["images"], "passes": c["passes"], "seconds": c["seconds"]}
            for c in computed
        ],
        "passes": sum(c["passes"] for c in computed),
        "recomputed": notes,
        "stages": stages,
        "el2n_snapshot": snapshots[el2n_at].name,
        "analysed_split": main["split"],
        "error_lowest_decile": by_decile[1]["error_rate"],
        "error_highest_decile": by_decile[A.BINS]["error_rate"],
        "auroc_vog": auroc_vog,
        "grids": grids,
        "seconds_gradients": round(t_gradients, 2),
        "seconds": round(time.perf_counter() - t0, 2),
        "output": str(out),
    }
    write_json(out / "summary.json", summary)
    text = _summary_markdown(cfg, snapshots, stages, el2n_at, results, main, overall, grids, summary)
    write_text_atomic(out / "summary.md", text)
    splits = ", ".join(f"{r['split']} ({r['images']})" for r in summary["splits"])
    line = (
        f"VoG over {k} snapshots for {splits} ({summary['passes']} snapshot passes computed) in "
        f"{summary['seconds']:.0f} s: {main['split']} error {100 * summary['error_lowest_decile']:.1f}% in the "
        f"lowest VoG decile, {100 * summary['error_highest_decile']:.1f}% in the highest; scores, tables and "
        f"plots -> {out}"
    )
    line += "".join(f"; {note}" for note in notes)
    return StageResult(summary, line)


def _summary_markdown(cfg, snapshots, stages, el2n_at, results, main, overall, grids, summary) -> str:
    out = cfg.run_dir / "vog"
    sizes = ", ".join(f"{r['split']} ({len(r['index'])} images)" for r in results)
    lines = [
        f"# VoG: {cfg.name}\n",
        f"- Snapshots: {len(snapshots)} ({snapshots[0].name} … {snapshots[-1].name}); "
        f"stages: {_stage_text(stages, snapshots)}.",
        f"- Splits: {sizes}. Final model error on {main['split']}: {100 * overall:.1f}%.",
    ]
    if cfg.vog.peers:
        grand = " and GraNd" if cfg.vog.grand else ""
        lines.append(
            f"- Peers: EL2N{grand} at {snapshots[el2n_at].name}; forgetting events, data-map confidence and "
            "variability over all snapshots (never-learned examples count K forgetting events)."
        )
    lines += ["", "## Error rate per VoG decile", "", (out / "deciles.md").read_text(), "![deciles](deciles.png)", ""]
    if (out / "auroc.md").exists():
        lines += ["## Flagging the examples made hard on purpose", "", (out / "auroc.md").read_text()]
    if (out / "correlations.md").exists():
        lines += ["## VoG and the peer scores", "", (out / "correlations.md").read_text()]
    lines += [
        "## Image grids",
        "",
        f"`grids/<class>.png`: the {cfg.vog.grid_k} lowest- and highest-VoG {main['split']} images of each of the "
        f"first {grids} classes, with the final model's predicted labels (red: wrong).",
        "",
        f"Computed in {summary['seconds']:.0f} s ({summary['seconds_gradients']:.0f} s for gradients; "
        f"{summary['passes']} snapshot passes run).",
    ]
    return "\n".join(lines).rstrip() + "\n"
