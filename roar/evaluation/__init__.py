"""Evaluation of attribution maps by removing what they rank highest or lowest.

``ablation`` ranks the positions of each image by its map (ties broken by a seeded hash, never by
scan order) and turns a fraction into an exact removal mask for ROAR, KAR, MoRF and LeRF;
``fills`` says what replaces the removed positions (``mean``, ``zero``, ``blur``; more by
registration in ``FILLS``). ROAR/KAR retraining and the perturbation curves both build on these;
``retrain_data`` turns a split and its stored maps into the ablated batch sources that retraining reads.
"""

from roar.evaluation.ablation import (
    GRANULARITIES,
    MODES,
    Ablation,
    count,
    mask_from_ranks,
    ranking,
    ranks,
    removal_mask,
    tie_break_keys,
)
from roar.evaluation.fills import FILLS, ablate, build_fill, gaussian_blur, list_fills
from roar.evaluation.retrain_data import InMemoryAblatedSource, StreamingAblatedSource, ablated_source

__all__ = [
    "FILLS",
    "GRANULARITIES",
    "MODES",
    "Ablation",
    "InMemoryAblatedSource",
    "StreamingAblatedSource",
    "ablate",
    "ablated_source",
    "build_fill",
    "count",
    "gaussian_blur",
    "list_fills",
    "mask_from_ranks",
    "ranking",
    "ranks",
    "removal_mask",
    "tie_break_keys",
]
