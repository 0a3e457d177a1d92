"""Localisation: how well an attribution map points at the ground-truth object.

Each metric reads ``maps`` [B, H, W] (reduced over channels) and ``masks`` [B, H, W] (True on the
object) and gives one value per image in [0, 1], higher is better:

* ``pointing_game``: whether the map's maximum lies on the object, up to a tolerance;
* ``relevance_mass``: the share of the positive relevance that lies on the object;
* ``relevance_rank``: the share of the |mask| most relevant pixels that lie on the object;
* ``top_k_intersection``: the share of a fixed number of most relevant pixels on the object;
* ``auc``: the ROC AUC of the map as a pixel-wise detector of the object;
* ``energy_pointing_game``: the share of the positive relevance inside the object's bounding box.

Quantus (Hedström et al., JMLR 2023) implements most of them; each docstring states where roar
follows its definition and where it differs, and ``tests/test_metrics_localisation.py`` checks the
values against Quantus 0.6 with matching parameters.

Degenerate inputs never give NaN (Quantus returns NaN for an empty mask): a value that would be a
ratio 0/0 is replaced by the value a map carrying no information gets, the *chance* value, and
each docstring says what that is. "The top pixels" are always taken with ``roar.perturb.ranking``,
so ties (a flat map, a clipped one) are broken by a seeded per-image hash, never by scan order,
and an image's value does not depend on its batch.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from roar.core.sorting import twice_average_ranks
from roar.metrics.base import Metric, MetricConfig, register
from roar.perturb.ranking import count, top_mask, top_position

NEEDS = frozenset({"maps", "masks"})

# --------------------------------------------------------------------------------------------- helpers


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, W] → [B, H·W]: every metric here treats an image's pixels as one set."""
    return x.reshape(x.shape[0], -1)


def _checked(maps: torch.Tensor) -> torch.Tensor:
    """The maps, refused if they hold NaN: a NaN relevance has no place in a sum or an order."""
    if torch.isnan(maps).any():
        raise ValueError("attribution maps contain NaN: the metric is undefined (recompute or repair the maps)")
    return maps


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float64 for sums over many pixels (float32 on MPS, which has no float64)."""
    return x.to(torch.float32 if x.device.type == "mps" else torch.float64)


def _share(numerator: torch.Tensor, denominator: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """numerator / denominator per image, ``fallback`` where the denominator is 0 (no NaN, no warning)."""
    empty = denominator == 0
    ratio = numerator / torch.where(empty, torch.ones_like(denominator), denominator)
    return torch.where(empty, fallback.to(ratio.dtype), ratio)


def _positive_mass(maps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Σ max(R, 0) over ``region`` / Σ max(R, 0) over the image; |region| / P when the map has no
    positive relevance (it then singles out nothing, like a flat map, which scores |region| / P)."""
    positive = _wide(_flat(_checked(maps))).clamp_min(0)
    region = _flat(region.bool())
    inside = (positive * region).sum(1)
    chance = region.sum(1) / region.shape[1]
    return _share(inside, positive.sum(1), chance).float()


def _top_share(maps: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor, seed: int, k: torch.Tensor):
    """Share of the k[b] top-ranked pixels of image b that lie on its object; 0 where k[b] = 0."""
    top = top_mask(maps, indices, seed, k)
    inside = (top & _flat(masks.bool())).sum(1)
    return (inside / k.clamp_min(1)).float()


class SeededConfig(MetricConfig):
    seed: int = Field(0, ge=0, description="seed of the tie-break between equally relevant pixels")


# --------------------------------------------------------------------------------------------- pointing game


class PointingGameConfig(SeededConfig):
    tolerance: int = Field(
        15, ge=0, description="pixels: a maximum at most this (Euclidean) distance from the object is a hit"
    )


@register
class PointingGame(Metric):
    """Pointing game (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016).

    1 if the map's maximum p* lies within ``tolerance`` pixels of the object, else 0:
    hit = [min over object pixels q of ‖p* − q‖₂ ≤ tolerance], i.e. p* lies in the mask dilated by
    a disk of radius ``tolerance``. The paper's tolerance is 15 pixels on ImageNet-size images; on
    32 × 32 images that covers most of the image, so set ``tolerance=0`` for the strict game.

    Against Quantus ``PointingGame``: Quantus has no tolerance (it plays the strict game,
    ``tolerance=0`` here) and counts a hit when *any* of several tied maxima lies on the object;
    here one maximum is chosen by the seeded tie-break, so a flat map is a hit with probability
    |mask| / P over seeds, not always. Its ``weighted`` option is not offered. An empty mask scores
    0 (Quantus 0.6 means to return NaN but, writing NaN into an array of booleans, returns a hit),
    a full one 1.
    """

    name = "pointing_game"
    direction = "higher"
    needs = NEEDS
    title = "Pointing game"
    config = PointingGameConfig

    def evaluate_batch(
        self, *, maps: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor, **_: Any
    ) -> dict[str, torch.Tensor]:
        h, w = maps.shape[-2:]
        top = top_position(maps, indices, self.params.seed)  # [B], flat index of the (tie-broken) maximum
        rows = torch.arange(h, device=maps.device)[None, :, None] - (top // w)[:, None, None]
        cols = torch.arange(w, device=maps.device)[None, None, :] - (top % w)[:, None, None]
        near = rows**2 + cols**2 <= self.params.tolerance**2  # [B, H, W], the disk around the maximum
        hit = (near & masks.bool()).flatten(1).any(1)
        return {self.name: hit.float()}


# --------------------------------------------------------------------------------------------- mass and rank


@register
class RelevanceMass(Metric):
    """Relevance mass accuracy (Arras, Osman & Samek, "CLEVR-XAI: a benchmark dataset for the ground
    truth evaluation of neural network explanations", Information Fusion 2022).

    R_within / R_total = Σ_{p ∈ mask} max(R_p, 0) / Σ_p max(R_p, 0): the share of the positive
    relevance that falls on the object. Negative relevance is set to 0, as Arras et al. score only
    positive evidence; a map without positive relevance scores |mask| / P, the value of a flat map.

    Against Quantus ``RelevanceMassAccuracy``: Quantus sums the signed values (with ``abs=False``),
    so negative relevance outside the object *raises* its score and the ratio may leave [0, 1]; on
    maps clipped at 0 (or with ``abs=True`` on non-negative maps) the two agree. An empty mask
    scores 0 (Quantus: NaN).
    """

    name = "relevance_mass"
    direction = "higher"
    needs = NEEDS
    title = "Relevance mass accuracy"

    def evaluate_batch(self, *, maps: torch.Tensor, masks: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        return {self.name: _positive_mass(maps, masks)}


@register
class RelevanceRank(Metric):
    """Relevance rank accuracy (Arras, Osman & Samek, Information Fusion 2022).

    With K = |mask|, the share of the K top-ranked pixels that lie on the object: |top_K ∩ mask| / K.
    1 when the object's pixels are exactly the most relevant ones; K / P for a random map. Ties are
    ranked by the seeded tie-break. An empty mask scores 0 (no pixel can hit it; Quantus: NaN).

    Follows Quantus ``RelevanceRankAccuracy`` (signed values ranked, no clipping); Quantus breaks
    ties by NumPy's unstable argsort instead.
    """

    name = "relevance_rank"
    direction = "higher"
    needs = NEEDS
    title = "Relevance rank accuracy"
    config = SeededConfig

    def evaluate_batch(
        self, *, maps: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor, **_: Any
    ) -> dict[str, torch.Tensor]:
        k = _flat(masks.bool()).sum(1)
        return {self.name: _top_share(_checked(maps), masks, indices, self.params.seed, k)}


class TopKConfig(SeededConfig):
    fraction: float = Field(
        0.02, gt=0, le=1, description="share of the pixels taken as the map's top k (at least one pixel)"
    )


@register
class TopKIntersection(Metric):
    """Top-k intersection (Theiner, Müller-Budack & Ewerth, "Interpretable semantic photo
    geolocation", WACV 2022; arXiv 2021).

    |top_k ∩ mask| / k: the share of the k top-ranked pixels on the object, with
    k = max(round(``fraction`` · P), 1) (halves up, ``roar.perturb.ranking.count``).

    Against Quantus ``TopKIntersection``: Quantus takes an absolute k (default 1000, ≈ 2% of a
    224 × 224 image), which is all but 24 pixels of a 32 × 32 image and more than the 64 of an
    8 × 8 one. Here k is a fraction of the image, default 0.02 to match Quantus's default on the
    images it was set for; with k = count(fraction, P) the two agree. Quantus's
    ``concept_influence`` rescaling (× P / |mask|) is not offered. An empty mask scores 0
    (Quantus: NaN); the chance value is |mask| / P.
    """

    name = "top_k_intersection"
    direction = "higher"
    needs = NEEDS
    title = "Top-k intersection"
    config = TopKConfig

    def evaluate_batch(
        self, *, maps: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor, **_: Any
    ) -> dict[str, torch.Tensor]:
        b, p = _flat(maps).shape
        k = torch.full((b,), max(count(self.params.fraction, p), 1), device=maps.device)
        return {self.name: _top_share(_checked(maps), masks, indices, self.params.seed, k)}


# --------------------------------------------------------------------------------------------- AUC


@register
class AUC(Metric):
    """ROC AUC of the map as a detector of the object's pixels (Fawcett, "An introduction to ROC
    analysis", Pattern Recognition Letters 2006).

    With n₁ object pixels, n₀ background pixels and r_p the average rank of pixel p's value
    (ascending, ties sharing their mean rank): AUC = (Σ_{p ∈ mask} r_p − n₁(n₁ + 1)/2) / (n₁ n₀),
    the Mann–Whitney U with ties counted as half, equal to sklearn's ``roc_auc_score`` and to the
    trapezoid area under the ROC curve. It is computed in exact integer arithmetic (2 r_p is an
    integer) and needs no tie-break. 1: every object pixel outranks every background pixel; 0.5:
    a random or flat map.

    Follows Quantus ``AUC`` (``roc_curve`` + ``auc`` on the signed values). An empty or full mask
    leaves one class empty and the AUC undefined; it scores 0.5, the chance value (Quantus: NaN).
    """

    name = "auc"
    direction = "higher"
    needs = NEEDS
    title = "AUC"

    def evaluate_batch(self, *, maps: torch.Tensor, masks: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        twice_ranks = twice_average_ranks(_flat(_checked(maps)))
        on_object = _flat(masks.bool())
        n1 = on_object.sum(1)
        n0 = on_object.shape[1] - n1
        twice_u = (twice_ranks * on_object).sum(1) - n1 * (n1 + 1)
        auc = _share(_wide(twice_u), _wide(2 * n1 * n0), torch.full_like(_wide(n1), 0.5))
        return {self.name: auc.float()}


# --------------------------------------------------------------------------------------------- energy


def _bounding_box(masks: torch.Tensor) -> torch.Tensor:
    """bool [B, H, W]: the smallest axis-aligned box holding every True pixel (empty for an empty mask).

    A row lies within the box's span when some object row is at or above it and some at or below
    it: a running "any" from the top and one from the bottom.
    """

    def span(any_along: torch.Tensor) -> torch.Tensor:
        from_start = any_along.int().cummax(1).values.bool()
        from_end = any_along.flip(1).int().cummax(1).values.bool().flip(1)
        return from_start & from_end

    masks = masks.bool()
    rows, cols = span(masks.any(2)), span(masks.any(1))
    return rows[:, :, None] & cols[:, None, :]


@register
class EnergyPointingGame(Metric):
    """Energy-based pointing game (Wang et al., "Score-CAM: score-weighted visual explanations for
    convolutional neural networks", CVPR Workshops 2020).

    Σ_{p ∈ box} max(R_p, 0) / Σ_p max(R_p, 0), where box is the object's bounding box: the share of
    the map's energy inside the box. Score-CAM defines it on bounding boxes (ILSVRC annotations), so
    the box here is the tightest box around the mask; that is what tells it apart from
    ``relevance_mass``, the same ratio on the mask itself (the two agree on box-shaped objects).
    Score-CAM's maps are non-negative (ReLU) and min–max normalised; here the map is clipped at 0,
    and no positive minimum is subtracted. A map without positive relevance scores |box| / P (a
    flat map's value); an empty mask, 0.

    Quantus 0.6 has no energy-based pointing game; its ``AttributionLocalisation`` (Kohlbrenner
    et al. 2020) computes the same ratio on the mask itself.
    """

    name = "energy_pointing_game"
    direction = "higher"
    needs = NEEDS
    title = "Energy-based pointing game"

    def evaluate_batch(self, *, maps: torch.Tensor, masks: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        return {self.name: _positive_mass(maps, _bounding_box(masks))}
