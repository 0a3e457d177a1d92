"""Complexity: how concentrated an attribution map is, read from the map alone (no mask, no model).

A map that puts its relevance on few pixels is easier to read; these metrics measure that on
a = |R|, the magnitude of each pixel's relevance (as Quantus, whose complexity metrics take the
absolute value by default):

* ``sparseness``: the Gini index of a, higher is better (sparser);
* ``complexity``: the entropy of a / Σa, lower is better;
* ``effective_complexity``: the share of pixels whose a exceeds a small threshold, lower is better.

They are scale-free: multiplying a map by a positive number leaves each value unchanged (Gini and
entropy are ratios; the threshold is relative to the image's largest magnitude).

A map that is zero everywhere singles out no pixel and is scored as a flat map: the worst value
of each metric (sparseness 0, complexity log P, effective complexity 1), so a method that returns
nothing is never rewarded. Quantus gives it a Gini index of 0 (through its +1e-7), an entropy of
NaN and an effective complexity of 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from roar.core.sorting import sorted_rows
from roar.metrics.base import Metric, MetricConfig, register

NEEDS = frozenset({"maps"})


def _magnitudes(maps: torch.Tensor) -> torch.Tensor:
    """|R| as [B, P], in float64 (float32 on MPS, which has no float64): weighted sums over many
    pixels that nearly cancel (the Gini index of a near-flat map) need the precision."""
    if torch.isnan(maps).any():
        raise ValueError("attribution maps contain NaN: the metric is undefined (recompute or repair the maps)")
    wide = torch.float32 if maps.device.type == "mps" else torch.float64
    return maps.reshape(maps.shape[0], -1).to(wide).abs()


def _or_flat(values: torch.Tensor, total: torch.Tensor, flat_value: float) -> torch.Tensor:
    """``values``, with ``flat_value`` for the images whose map is zero everywhere (``total`` = 0)."""
    return torch.where(total > 0, values, torch.full_like(values, flat_value))


def _safe(total: torch.Tensor) -> torch.Tensor:
    """A divisor: ``total``, with 1 in place of 0 (those images are replaced by ``_or_flat``)."""
    return torch.where(total > 0, total, torch.ones_like(total))


@register
class Sparseness(Metric):
    """Sparseness (Chalasani et al., "Concise explanations of neural networks using adversarial
    training", ICML 2020): the Gini index of a = |R|.

    With a sorted ascending, a₍₁₎ ≤ … ≤ a₍ₙ₎: G = Σᵢ (2i − n − 1) a₍ᵢ₎ / (n Σᵢ a₍ᵢ₎). 0 for a flat map,
    (n − 1)/n for a one-hot map (the maximum); higher is sparser, which is better.

    Follows Quantus ``Sparseness`` (``abs=True``), except that Quantus adds 1e-7 to every value
    (to avoid 0/0) and so differs by O(1e-7 / mean |R|); a zero map scores 0 in both.
    """

    name = "sparseness"
    direction = "higher"
    needs = NEEDS
    title = "Sparseness (Gini)"

    def evaluate_batch(self, *, maps: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        a = sorted_rows(_magnitudes(maps))
        n = a.shape[1]
        weights = 2 * torch.arange(1, n + 1, device=a.device, dtype=a.dtype) - n - 1
        total = a.sum(1)
        gini = (weights * a).sum(1) / (n * _safe(total))
        return {self.name: _or_flat(gini, total, 0.0).float()}


@register
class Complexity(Metric):
    """Complexity (Bhatt, Weller & Moura, "Evaluating and aggregating feature-based model
    explanations", IJCAI 2020): the entropy of the map's magnitudes as a distribution.

    With pᵢ = aᵢ / Σⱼ aⱼ, a = |R|: H = −Σᵢ pᵢ ln pᵢ (nats, 0 ln 0 = 0). 0 for a one-hot map, ln P
    for a flat map (the maximum); lower is better.

    Follows Quantus ``Complexity`` (``abs=True``), which computes −Σ p ln(p + 1e-12) and so differs
    by at most P · 1e-12; a zero map scores ln P here, NaN in Quantus.
    """

    name = "complexity"
    direction = "lower"
    needs = NEEDS
    title = "Complexity (entropy)"

    def evaluate_batch(self, *, maps: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        a = _magnitudes(maps)
        total = a.sum(1)
        p = a / _safe(total)[:, None]
        entropy = -torch.special.xlogy(p, p).sum(1)
        return {self.name: _or_flat(entropy, total, math.log(a.shape[1])).float()}


class EffectiveComplexityConfig(MetricConfig):
    eps: float = Field(1e-5, ge=0, lt=1, description="threshold on |R| / max |R| above which a pixel counts")


@register
class EffectiveComplexity(Metric):
    """Effective complexity (Nguyen & Martínez, "On quantitative aspects of model interpretability",
    arXiv 2020): how many pixels carry relevance above a threshold, as a share of the pixels.

    |{p : |R_p| / max_q |R_q| > eps}| / P. The share, not the count, so images of different sizes
    compare; lower is better. A flat map scores 1, a one-hot map 1/P.

    Against Quantus ``EffectiveComplexity`` (``eps`` = 1e-5 there too): Quantus returns the count
    and, by default (``normalise=True``), divides the maps by the largest magnitude of the whole
    *batch*, so an image's value depends on its batch; here each map is divided by its own largest
    magnitude. Quantus's count on maps so normalised, divided by P, equals this value. A zero map
    scores 1 here (a flat map's value), 0 in Quantus.
    """

    name = "effective_complexity"
    direction = "lower"
    needs = NEEDS
    title = "Effective complexity"
    config = EffectiveComplexityConfig

    def evaluate_batch(self, *, maps: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        a = _magnitudes(maps)
        peak = a.amax(1)
        above = a / _safe(peak)[:, None] > self.params.eps
        share = above.sum(1) / a.shape[1]
        return {self.name: _or_flat(share.to(a.dtype), peak, 1.0).float()}
