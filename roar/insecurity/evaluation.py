"""Precision and recall of binarised insecurity maps against ground-truth regions, and the curve's area.

Deliberative explanations (Wang & Vasconcelos, NeurIPS 2019) are scored by how well the top-r
fraction of an insecurity map covers the region the two ambiguous classes share (CUB-200: shared
parts; ADE20K: shared objects), as curves over r. For a map binarised at r (B) and its region (G):
precision = |B ∩ G| / |B|, recall = |B ∩ G| / |G|.

Binarisation. The top r of H·W pixels is exactly ``count(r, H·W)`` pixels (r·H·W rounded half up,
at least 1), chosen by ``roar.perturb.ranking.ranking``: equal values (the zeros of a clipped map,
the plateaus of a map upsampled from 8×8) are ordered by a hash of (seed, image index, pixel), never
by scan order, so a threshold inside a plateau picks a reproducible, spatially unbiased subset and
an image gets the same result in any batch. One sort per map serves every r: the hits among the
first k ranked pixels are a cumulative sum read at each count.

Empty regions. Recall is undefined (NaN) for a map whose region is empty; its precision is then 0
(no selected pixel can be inside). ``pr_area`` leaves such maps out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from roar.perturb.ranking import count, ranking

DEFAULT_FRACTIONS: tuple[float, ...] = (
    0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1,
    0.12, 0.14, 0.16, 0.18, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45,
    0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
)  # fmt: skip
"""26 fractions r, every 1% up to 10%, coarser above: insecurity maps are peaked, so the small-r end of
the curve is where methods differ; 1.0 closes every curve at recall 1."""

_CHUNK_POSITIONS = 1 << 22
"""Pixels ranked at once (maps per chunk × H·W): a few int64 tensors of 32 MB, whatever N is."""


def pixel_counts(fractions: Sequence[float], n_positions: int) -> list[int]:
    """The number of pixels selected for each fraction r in (0, 1]: ``count(r, n)``, at least 1.

    At least one pixel, because a binarised map with no pixel has no precision; a fraction 0 is
    refused for the same reason rather than silently turned into one pixel.
    """
    fractions = [float(f) for f in fractions]
    if not fractions:
        raise ValueError("at least one fraction is needed")
    bad = [f for f in fractions if not (math.isfinite(f) and 0.0 < f <= 1.0)]
    if bad:
        raise ValueError(f"fractions must be in (0, 1], got {bad}")
    return [max(count(f, n_positions), 1) for f in fractions]


def precision_recall(
    maps: torch.Tensor,
    regions: torch.Tensor,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    indices: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(precision, recall), float64 [N, R] each: every map [N, H, W] binarised at each fraction, against its region.

    ``regions`` [N, H, W] is True (non-zero) inside the ground-truth region. ``indices`` [N] are the
    images' dataset indices, which seed the tie-break with ``seed`` (default ``arange(N)``: pass the
    real indices to get the same numbers for an image in any batch). Recall is NaN where a region is
    empty, precision is then 0. Columns follow ``fractions`` in the given order; ``pr_area`` expects
    them increasing. Maps are ranked in chunks so memory stays bounded for thousands of 224×224 maps.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got {tuple(maps.shape)}")
    if tuple(regions.shape) != tuple(maps.shape):
        raise ValueError(f"regions must have the maps' shape {tuple(maps.shape)}, got {tuple(regions.shape)}")
    n, h, w = maps.shape
    ks = torch.tensor(pixel_counts(fractions, h * w), dtype=torch.int64, device=maps.device)
    if indices is None:
        indices = torch.arange(n, device=maps.device)
    indices = torch.as_tensor(indices, device=maps.device).reshape(-1)
    if len(indices) != n:
        raise ValueError(f"{len(indices)} indices for {n} maps")
    inside = (regions != 0).flatten(1).to(maps.device)  # [N, H·W]
    hits = torch.empty(n, len(ks), dtype=torch.int64, device=maps.device)
    chunk = max(1, _CHUNK_POSITIONS // (h * w))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        hits[start:stop] = _hits(maps[start:stop], inside[start:stop], indices[start:stop], seed, ks)
    hits = hits.to(torch.float64)
    sizes = inside.sum(dim=1, dtype=torch.float64)[:, None]  # |G|
    precision = hits / ks.to(torch.float64)
    recall = torch.where(sizes > 0, hits / sizes.clamp(min=1), torch.full_like(hits, math.nan))
    return precision, recall


def _hits(maps: torch.Tensor, inside: torch.Tensor, indices: torch.Tensor, seed: int, ks: torch.Tensor) -> torch.Tensor:
    """int64 [n, R]: |B ∩ G| for the top ``ks`` pixels of each map, from one ranking and one cumulative sum."""
    order = ranking(maps, indices, seed)  # [n, H·W], most relevant first
    cumulative = inside.gather(1, order).cumsum(dim=1)  # hits among the first 1, 2, … ranked pixels
    return cumulative[:, ks - 1]


def pr_area(precision: torch.Tensor, recall: torch.Tensor) -> float:
    """The area under the mean precision-recall curve: Σ_r (R̄(r) − R̄(r_prev)) · P̄(r), with R̄ = 0 before the first r.

    P̄ and R̄ are the curves averaged over the maps whose region is not empty (recall not NaN); the
    others carry no information on recall and are left out (NaN if none is left). The step rule is
    scikit-learn's average precision: for one map without ties and the fractions k/(H·W), k = 1 … H·W,
    the area equals ``average_precision_score(region.ravel(), map.ravel())``; a coarser grid is a
    coarser sum of the same curve. Columns must be in increasing fraction order, so R̄ never decreases.
    """
    precision = torch.as_tensor(precision, dtype=torch.float64)
    recall = torch.as_tensor(recall, dtype=torch.float64)
    if precision.ndim != 2 or precision.shape != recall.shape:
        raise ValueError(
            f"precision and recall must be [N, R] of one shape, got {tuple(precision.shape)}, {tuple(recall.shape)}"
        )
    valid = ~torch.isnan(recall).any(dim=1)
    if not valid.any():
        return math.nan
    mean_precision = precision[valid].mean(dim=0)
    mean_recall = recall[valid].mean(dim=0)
    previous = torch.cat([mean_recall.new_zeros(1), mean_recall[:-1]])
    steps = mean_recall - previous
    if (steps < -1e-12).any():
        raise ValueError("mean recall decreases along the columns: order them by increasing fraction")
    return float((steps * mean_precision).sum())
