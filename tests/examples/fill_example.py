"""A new fill in one file: replace removed pixels by uniform noise, drawn per image from its dataset index.

To add it to roar, save this as ``roar/perturb/noise_fill.py`` and import it in
``roar/perturb/__init__.py``; ``retrain.fill: {name: uniform_noise, seed: 1}`` or
``curves.fill: uniform_noise`` then validates (unknown keys rejected) and runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from roar.perturb.fills import FILLS, FillSection, noise_seed


class UniformNoiseFillConfig(FillSection):
    name: Literal["uniform_noise"] = "uniform_noise"
    seed: int = Field(0, ge=0, lt=2**63, description="an image's noise depends on this seed and its dataset index")


class UniformNoiseFill:
    """U(0, 1) noise in [0, 1] space: an image gets the same noise in any batch (seeded by its index)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, images: torch.Tensor, removed: torch.Tensor, **context: Any) -> torch.Tensor:
        indices = context.get("indices")
        rows = range(len(images)) if indices is None else torch.as_tensor(indices).reshape(-1).tolist()
        noise = [
            torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(noise_seed(self.seed, int(i))))
            for i in rows
        ]
        return torch.stack(noise).to(images.device, images.dtype)


@FILLS.register("uniform_noise", UniformNoiseFillConfig)
def build_uniform_noise(cfg: UniformNoiseFillConfig, mean: Sequence[float] | None = None) -> UniformNoiseFill:
    return UniformNoiseFill(cfg.seed)
