"""``roar insecurity``: deliberative insecurity maps of a trained run, and how well they find the ambiguity.

1. The images: the split's ``two_objects`` images by default (each shows its labelled object and
   a second object of another class, so the network has two known classes to be torn between),
   every hard-tagged image, or all; optionally a seeded subset.
2. The hardness predictors of the ``hp`` score, cross-fitted over folds of the split
   (``roar.stages.insecurity.hardness``).
3. The maps (``roar.stages.insecurity.store``): per image, its ambiguous pairs and, for every
   score × variant, their insecurity maps, in ``maps.h5``; resumable after kill -9.
4. The evaluation (``roar.stages.insecurity.evaluate``): precision and recall of the binarised
   maps against the region that carries evidence for each pair (``ImageSplit.pair_evidence``),
   curves over the top-r fraction, their areas, baselines, and how often the pair found is the
   pair the image was built from.

Outputs in ``<run>/insecurity/``: ``maps.h5``, ``results.csv``, ``areas.csv``, ``summary.md``,
``summary.json``, ``pr.png``, ``examples.png``, ``hardness/``, ``config.yaml``, ``provenance.json``.
"""

from __future__ import annotations

import time

import numpy as np

from roar.attribution.engine import prepare_model
from roar.attribution.gradcam import resolve_layer
from roar.attribution.layer import layer_features
from roar.config import RunConfig
from roar.core.device import resolve_device
from roar.core.errors import RoarError
from roar.core.locks import output_folder
from roar.core.provenance import file_hash, record_run
from roar.data import TAGS, ImageSplit, build_dataset
from roar.stages.insecurity import evaluate, store
from roar.stages.insecurity.hardness import ensure_predictors
from roar.stages.result import StageResult
from roar.stages.train import load_run_model

HARD_TAGS = [i for i, name in enumerate(TAGS) if name != "clean"]


def chosen_rows(split: ImageSplit, cfg: RunConfig, dataset_name: str) -> tuple[np.ndarray, str]:
    """The split's rows that get maps, ascending, and what they are ('two_objects', 'hard', 'all');
    a RoarError when the choice selects nothing."""
    ic = cfg.insecurity
    images = ic.images
    if images == "auto":
        tagged = split.tags is not None and bool((split.tags == TAGS.index("two_objects")).any())
        images = "two_objects" if tagged else "all"
    if images == "all":
        rows = np.arange(len(split))
    else:
        if split.tags is None:
            raise RoarError(
                f"insecurity.images: dataset '{dataset_name}' tags no examples as {images}; set insecurity.images: all"
            )
        wanted = [TAGS.index("two_objects")] if images == "two_objects" else HARD_TAGS
        rows = np.flatnonzero(np.isin(split.tags.numpy(), wanted))
    if not len(rows):
        raise RoarError(f"insecurity.images: the {ic.split} split has no {images} images")
    if ic.max_images is not None and ic.max_images < len(rows):
        rows = np.sort(np.random.default_rng([cfg.seed, 23]).choice(rows, size=ic.max_images, replace=False))
    return rows, images


def run(cfg: RunConfig) -> StageResult:
    """``roar insecurity`` for a run; everything that can refuse it is checked before anything is written."""
    t0 = time.perf_counter()
    ic = cfg.insecurity
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.dataset)
    trained, _, model_path = load_run_model(cfg, dataset, device)
    split = dataset.split(ic.split)
    rows, selection = chosen_rows(split, cfg, dataset.name)
    probe = split.read(rows[:16]).float().div_(255).to(device)
    model = prepare_model(trained, device, probe=probe)
    layer_name, layer = resolve_layer(model, ic.layer, probe)
    feature_size = tuple(layer_features(model, probe[:1], layer)[1].shape[2:])
    ground_truth = split.pair_evidence(int(rows[0]), 0, 1) is not None
    inputs = {
        "model": file_hash(model_path),
        "dataset": dataset.fingerprint(),
        "split": ic.split,
        "layer": layer_name,
    }
    with output_folder(cfg.run_dir / "insecurity") as out:
        predictors = None
        if "hp" in ic.scores:
            predictors = ensure_predictors(out / "hardness", ic, cfg.seed, model, split, layer, inputs, device)
        t_maps = time.perf_counter()
        written = store.write_maps(
            out / "maps.h5", cfg, dataset, split, rows, model, layer, inputs, predictors, device, feature_size
        )
        t_maps = time.perf_counter() - t_maps
        record_run(out, cfg, {"dataset": inputs["dataset"], "model": inputs["model"]}, device)
        with store.open_maps(out / "maps.h5") as maps:
            results = evaluate.evaluate(maps, cfg, dataset, split, ground_truth)
        notes = [n for n in (predictors.note if predictors else "", written["note"]) if n]
        summary = {
            "images": len(rows),
            "selection": selection,
            "split": ic.split,
            "layer": layer_name,
            "scores": ic.scores,
            "variants": ic.variants,
            "maps_computed": written["computed"],
            "seconds_maps": round(t_maps, 2),
            "hardness": predictors.report if predictors else None,
            **results.summary,
            "recomputed": notes,
            "seconds": round(time.perf_counter() - t0, 2),
            "output": str(out),
        }
        evaluate.write_outputs(out, cfg, dataset, split, results, summary)
    return StageResult(summary, evaluate.summary_line(summary, notes))
