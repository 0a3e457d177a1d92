"""A worked example of a metric: the share of a map's top pixels that fall on the object.

It is complete as it stands; in the package it would be a module ``roar/metrics/top_in_mask.py``
with ``@register`` above the class and one line ``from roar.metrics import top_in_mask`` in
``roar/metrics/__init__.py``. It lives among the tests, unregistered, because a registered metric
is evaluated by every stage that can supply its needs: ``tests/test_metrics.py`` registers it into
a copy of ``METRICS`` instead, which no stage or other test reads.

What it shows:

* the declarations: ``name`` (also the key of its values), ``direction`` (on the object is
  better: ``higher``), ``needs`` (the maps and the ground-truth masks, not the model);
* parameters through a ``MetricConfig`` subclass, validated when the metric is built
  (``METRICS.create("top_in_mask", fraction=0.05)``);
* ``evaluate_batch`` naming the inputs it reads (``maps``, ``masks``, ``indices``) and swallowing
  the rest (``**_``), returning one value per image computed from that image alone;
* ranking through ``roar.perturb.ranking``, whose seeded tie-break makes "the top k pixels" of a
  map with ties (a flat map, a saturated one) one fixed set per image, whatever its batch.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from roar.metrics import Metric, MetricConfig
from roar.perturb.ranking import count, ranks


class TopInMaskConfig(MetricConfig):
    fraction: float = Field(0.1, gt=0, le=1, description="share of the pixels taken as the map's top")
    seed: int = Field(0, description="seed of the tie-break between equally relevant pixels")


class TopInMask(Metric):
    """Share of the top ``fraction`` of an image's pixels, by its map, that lie inside its object mask.

    1 when every top pixel is on the object, the object's share of the image for a random map.
    """

    name = "top_in_mask"
    direction = "higher"
    needs = frozenset({"maps", "masks"})
    title = "Top pixels on the object"
    config = TopInMaskConfig

    def evaluate_batch(
        self, *, maps: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor, **_: Any
    ) -> dict[str, torch.Tensor]:
        h, w = maps.shape[-2:]
        k = max(count(self.params.fraction, h * w), 1)
        top = ranks(maps, indices, self.params.seed)[:, 0] < k  # [B, H, W], exactly k True per image
        inside = (top & masks.bool()).flatten(1).sum(1)
        return {self.name: inside.float() / k}
