"""ResNet-50 from torchvision, for ImageNet-sized data.

``weights: imagenet`` asks torchvision for its pretrained weights (a download the first time,
then torchvision's cache); ``weights: <path>`` loads a local state dict, so an offline machine
can use weights copied onto it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from roar.core.errors import RoarError
from roar.models.base import ModelConfig
from roar.models.registry import MODELS


class ResNet50Config(ModelConfig):
    name: Literal["resnet50"] = "resnet50"
    weights: str | None = None  # None: random init; "imagenet": torchvision's; else a file path


def _pretrained() -> dict:
    from torchvision.models import ResNet50_Weights  # imported on use: torchvision takes seconds to import

    try:
        return ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=False)
    except Exception as exc:  # urllib raises several types when offline
        raise RoarError(
            "could not fetch torchvision's ImageNet weights for resnet50 "
            f"({type(exc).__name__}: {exc}); on an offline machine copy the file to this machine "
            "and set model.weights to its path"
        ) from None


def _local(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise RoarError(f"model.weights: no file at '{path}' (use 'imagenet' or a path to a state dict)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RoarError(f"model.weights: cannot read '{path}': {exc}") from None
    return state.get("model", state) if isinstance(state, dict) else state


@MODELS.register("resnet50", ResNet50Config)
def build_resnet50(cfg: ResNet50Config, num_classes: int, geometry: tuple[int, ...]) -> nn.Module:
    from torchvision.models import resnet50

    net = resnet50(num_classes=1000 if cfg.weights else num_classes)
    if cfg.weights:
        state = _pretrained() if cfg.weights == "imagenet" else _local(cfg.weights)
        state = {k.removeprefix("net."): v for k, v in state.items() if k not in ("mean", "std")}
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise RoarError(f"model.weights: '{cfg.weights}' is not a resnet50 state dict: {str(exc)[:200]}") from None
        if num_classes != 1000:  # fine-tuning to another label set: a fresh head
            net.fc = nn.Linear(net.fc.in_features, num_classes)
    if geometry[0] != 3:
        raise RoarError(f"resnet50 takes 3-channel images, the dataset has {geometry[0]}")
    return net
