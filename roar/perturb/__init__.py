"""Perturbation primitives: which positions of an image to replace, and with what.

``ranking`` ranks the positions of each image by its map (ties broken by a seeded hash, never by
scan order), counts exactly and turns a fraction into the one removal mask that ROAR, KAR, MoRF
and LeRF share; ``fills`` says what replaces the removed positions (``FILLS``: ``mean``, ``zero``,
``blur``, ``road``, ``patch_mean``, and the inpainters of ``inpainters``: ``segment_mean``,
``biharmonic``, ``plugin``; more by registration); ``road`` is ROAD's noisy linear imputation;
``curves`` measures a model on growing perturbations of a batch.
"""

from roar.perturb import inpainters  # noqa: F401  (registers segment_mean, biharmonic, plugin)
from roar.perturb.fills import FILLS, ablate, build_fill, gaussian_blur, list_fills
from roar.perturb.ranking import (
    GRANULARITIES,
    MODES,
    count,
    mask_from_ranks,
    ranking,
    ranks,
    removal_mask,
    tie_break_keys,
)
from roar.perturb.road import road_impute

__all__ = [
    "FILLS",
    "GRANULARITIES",
    "MODES",
    "ablate",
    "build_fill",
    "count",
    "gaussian_blur",
    "list_fills",
    "mask_from_ranks",
    "ranking",
    "ranks",
    "removal_mask",
    "road_impute",
    "tie_break_keys",
]
