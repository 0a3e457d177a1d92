"""What wraps every network: normalisation inside the model.

Attribution, ablation and fills all work on images in [0, 1]; the model normalises them itself.
Gradients are then taken with respect to the pixels a researcher sees and ablates, and a ROAR
fill of "the dataset mean" means the same thing in every stage.
"""

from __future__ import annotations

import torch
from torch import nn

from roar.core.schema import Section


class ModelConfig(Section):
    """Keys every model accepts."""


class Classifier(nn.Module):
    """``net`` behind a fixed per-channel normalisation: input images in [0, 1]."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] or feature vectors [B, C]: statistics are per channel (dim 1)."""
        shape = (1, -1) + (1,) * (inputs.ndim - 2)
        return self.net((inputs - self.mean.view(shape)) / self.std.view(shape))
