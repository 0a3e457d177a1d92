"""The insecurity maps of a run, in ``<run>/insecurity/maps.h5`` through the array store.

Layout. Row i is the i-th chosen image (``indices`` holds its row in the split). One array set per
score × variant, named ``<score>.<variant>`` (``hp.2ndg``), holds P + 2 maps at the layer's
resolution h×w (readers bring them to the image's size with ``roar.insecurity.ambiguity.upsample``,
the bilinear upsampling the paper applies to the product: storing them before it costs
(H·W)/(h·w) less, 1024× for ResNet-50's 7×7 maps of 224×224 images):

* slots 0 … P−1: the insecurity map of each rank pair (``roar.insecurity.ambiguity.rank_pairs``;
  P = 10 for the top 5 classes), exactly 0 for a pair that is no ambiguity of the image;
* slot P: the difficulty map D alone (a baseline);
* slot P+1: the class map of the top class alone (a baseline).

Each slot is divided by its own maximum before it is stored: the evaluation only ranks pixels
within a map, and a common float16 scale for maps whose magnitudes differ by orders (A·A·D
against D) would flush the small ones to zero. What the scaling removes is kept beside the maps as
extra row arrays: ``totals.<score>.<variant>`` (each pair's total insecurity, which decides the
strongest pair). Also per row: ``top`` (the top classes), ``pairs.<class variant>`` (which slots are
ambiguities: the class maps of 2ndG are the gradient ones, so it has no pairs of its own),
``scores`` (the difficulty scores' values) and ``fold`` (the hardness predictor that scored it).

A store made from other inputs (model, data, images, layer, settings, hardness predictors) is
deleted and computed again, and the stage says why; a killed run resumes from its finished chunks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import roar
from roar.core.errors import RoarError
from roar.core.provenance import changed_keys, fingerprint, flatten
from roar.data import Dataset, ImageSplit
from roar.insecurity.ambiguity import ambiguous_pairs, insecurity_maps, rank_pairs
from roar.insecurity.maps import SCORES, DeliberationMaps, deliberation_maps, predictor_score
from roar.store import MapStore, StoreWriter, staging_path

RERUN = "roar insecurity"
LAYOUT = "pairs, difficulty, top class; at the layer's resolution"


def class_variant(variant: str) -> str:
    """The variant whose class maps (and pairs) a variant uses: 2ndG adds to D only."""
    return "gradient" if variant == "2ndg" else variant


def set_name(score: str, variant: str) -> str:
    return f"{score}.{variant}"


def _plan(cfg, rows: np.ndarray, inputs: dict, predictors, feature_size: tuple[int, int]) -> dict:
    """Everything that shapes the stored maps, the extras declared, and the array sets."""
    ic = cfg.insecurity
    p = len(rank_pairs(ic.top))
    h, w = feature_size
    class_variants = sorted({class_variant(v) for v in ic.variants})
    identity = {
        **inputs,
        "rows": fingerprint(rows.tolist()),
        "top": ic.top,
        "per_location": ic.per_location,
        "ig_steps": ic.ig_steps,
        "scores": list(ic.scores),
        "variants": list(ic.variants),
        "hardness": predictors.digest if predictors is not None else None,
        "layout": LAYOUT,
    }
    extras = {
        "top": ("int64", (ic.top,)),
        "scores": ("float32", (len(ic.scores),)),
        "fold": ("int64", ()),
        **{f"pairs.{cv}": ("bool", (p,)) for cv in class_variants},
        **{f"totals.{set_name(s, v)}": ("float32", (p,)) for s in ic.scores for v in ic.variants},
    }
    sets = {set_name(s, v): {"score": s, "variant": v} for s in ic.scores for v in ic.variants}
    return {"identity": identity, "extras": extras, "sets": sets, "geometry": (p + 2, h, w), "pairs": p}


def _discard_stale(path: Path, plan: dict, dataset_fingerprint: str, n: int) -> str:
    """Delete a store (finished or staged) made from other inputs; returns why, or '' if there is none."""
    if not path.exists() and not staging_path(path).exists():
        return ""
    try:
        with MapStore.open(path, require_complete=False, rerun=RERUN) as old:
            recorded = {
                **{k: v for k, v in old.identity.items() if k != "extras"},
                "images": old.n,
                "geometry": list(old.geometry),
                "dataset_fingerprint": old.attrs.get("dataset_fingerprint"),
                "sets": sorted(old.methods),
            }
    except RoarError:
        recorded = None  # unreadable: recomputed
    current = {
        **plan["identity"],
        "images": n,
        "geometry": list(plan["geometry"]),
        "dataset_fingerprint": dataset_fingerprint,
        "sets": sorted(plan["sets"]),
    }
    if recorded is not None and flatten(recorded) == flatten(current):
        return ""
    why = "an unreadable store" if recorded is None else "inputs changed: " + ", ".join(changed_keys(recorded, current))
    path.unlink(missing_ok=True)
    shutil.rmtree(staging_path(path), ignore_errors=True)
    return f"insecurity maps recomputed ({why})"


def write_maps(
    path: Path, cfg, dataset: Dataset, split: ImageSplit, rows, model, layer, inputs, predictors, device, feature_size
) -> dict:
    """Compute and store every chosen image's maps, resuming a killed run; returns
    ``{"computed": images computed now, "note": why an old store was discarded, or ''}``."""
    ic = cfg.insecurity
    plan = _plan(cfg, rows, inputs, predictors, feature_size)
    fp = split.fingerprint()
    note = _discard_stale(path, plan, fp, len(rows))
    writer = StoreWriter(
        path,
        split=ic.split,
        n=len(rows),
        geometry=plan["geometry"],
        dataset=dataset.name,
        dataset_fingerprint=fp,
        model_hash=inputs["model"],
        channels=True,
        methods=plan["sets"],
        identity=plan["identity"],
        provenance={"roar_version": roar.__version__, "seed": cfg.seed},
        rerun=RERUN,
        extras=plan["extras"],
    )
    computed = 0
    with writer:
        step = writer.chunk_rows()  # a kill between two sets' files of a chunk leaves it done for some only
        starts = sorted({s for name in plan["sets"] for a, b in writer.pending(name) for s in range(a, b, step)})
        for start in tqdm(starts, desc="insecurity maps", unit="chunk", leave=False, disable=None):
            stop = min(start + step, len(rows))
            chunk = rows[start:stop]
            maps, extras = chunk_maps(cfg, split, chunk, model, layer, predictors, device, plan["pairs"])
            predictions = extras["top"][:, 0]
            writer.write(start, maps, split.labels[chunk], predictions, chunk, extras=extras)
            computed += len(chunk)
        writer.finish()
    return {"computed": computed, "note": note}


def open_maps(path: Path) -> MapStore:
    return MapStore.open(path, rerun=RERUN)


def _unit_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map [..., H, W] divided by its maximum (maps ≥ 0; an all-zero map stays zero)."""
    peak = maps.flatten(-2).amax(-1)[..., None, None]
    return torch.where(peak > 0, maps / peak.clamp(min=torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def _deliberation(cfg, images, model, layer, folds: np.ndarray, predictors) -> DeliberationMaps:
    """The feature-level maps of a chunk; with ``hp``, each image scored by its own fold's predictor."""
    ic = cfg.insecurity
    kwargs = {"variants": tuple(ic.variants), "top": ic.top, "ig_steps": ic.ig_steps, "max_batch": ic.max_batch}
    scores = {name: SCORES[name] for name in ic.scores if name != "hp"}
    if predictors is None:
        return deliberation_maps(model, images, layer, scores, **kwargs)
    parts = {}
    for k in np.unique(folds):
        members = np.flatnonzero(folds == k)
        fold_scores = {**scores, "hp": predictor_score(predictors.heads[int(k)])}
        fold_scores = {name: fold_scores[name] for name in ic.scores}
        parts[int(k)] = (members, deliberation_maps(model, images[members], layer, fold_scores, **kwargs))
    return _merge(parts, len(images))


def _merge(parts: dict, n: int) -> DeliberationMaps:
    """One DeliberationMaps of n images from per-fold parts, every image back in its place."""

    def gather(get) -> torch.Tensor:
        first = get(next(iter(parts.values()))[1])
        out = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=first.device)
        for members, maps in parts.values():
            out[torch.as_tensor(members, device=first.device)] = get(maps)
        return out

    sample = next(iter(parts.values()))[1]
    return DeliberationMaps(
        top=gather(lambda m: m.top),
        logits=gather(lambda m: m.logits),
        class_maps={v: gather(lambda m, v=v: m.class_maps[v]) for v in sample.class_maps},
        difficulty={key: gather(lambda m, key=key: m.difficulty[key]) for key in sample.difficulty},
        scores={s: gather(lambda m, s=s: m.scores[s]) for s in sample.scores},
    )


def chunk_maps(cfg, split, chunk: np.ndarray, model, layer, predictors, device, p: int):
    """The stored maps and extra row arrays of the images at ``chunk`` (rows of the split)."""
    ic = cfg.insecurity
    images = split.read(chunk).to(device).float().div_(255)
    folds = predictors.fold_of[chunk] if predictors is not None else np.full(len(chunk), -1)
    d = _deliberation(cfg, images, model, layer, folds, predictors)
    pairs = {cv: ambiguous_pairs(d.class_maps[cv], ic.per_location) for cv in {class_variant(v) for v in ic.variants}}
    maps, extras = (
        {},
        {
            "top": d.top.cpu().numpy(),
            "scores": torch.stack([d.scores[s].float() for s in ic.scores], dim=1).cpu().numpy(),
            "fold": folds.astype(np.int64),
            **{f"pairs.{cv}": found.cpu().numpy() for cv, found in pairs.items()},
        },
    )
    for s in ic.scores:
        for v in ic.variants:
            cv = class_variant(v)
            difficulty = d.difficulty[(s, v)]
            insecurity = insecurity_maps(d.class_maps[cv], difficulty, pairs[cv])
            extras[f"totals.{set_name(s, v)}"] = insecurity.double().sum(dim=(2, 3)).float().cpu().numpy()
            slots = torch.cat(
                [
                    _unit_max(insecurity.float()),
                    _unit_max(difficulty.float())[:, None],
                    _unit_max(d.class_maps[cv][:, 0].float())[:, None],
                ],
                dim=1,
            )
            maps[set_name(s, v)] = slots.cpu().numpy()
    return maps, extras
