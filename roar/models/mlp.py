"""A small fully connected network: for feature vectors (the VoG toy experiment on 2-D blobs) or
flattened images."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field
from torch import nn

from roar.models.base import ModelConfig
from roar.models.registry import MODELS


class MLPConfig(ModelConfig):
    name: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64, 64], description="widths of the hidden layers")
    activation: Literal["relu", "tanh"] = Field("relu", description="tanh gives a smooth decision boundary")


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Flattens its input, so it takes feature vectors [B, D] and images [B, C, H, W] alike."""

    def __init__(self, in_features: int, num_classes: int, hidden=(64, 64), activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


@MODELS.register("mlp", MLPConfig)
def build_mlp(cfg: MLPConfig, num_classes: int, geometry: tuple[int, ...]) -> nn.Module:
    return MLP(math.prod(geometry), num_classes, tuple(cfg.hidden), cfg.activation)
