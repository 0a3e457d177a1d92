"""ResNet8 as in the ROAR seed (CIFAR-10 style).

Stem conv3×3 → 64, then one BasicBlock per stage at 64/128/256 channels with strides 1/2/2,
global average pooling and a linear classifier: ≈1.2 M parameters at the seed's widths. The
widths are configurable so that the CPU demo can use a narrower network.

The block is torchvision's BasicBlock, module for module (the same state-dict keys, one
in-place ReLU called twice), written out here because importing torchvision costs every roar
process about 3.5 s (its ops import TorchDynamo): every rank of a data-parallel run, sweep job
and array task paid it again just to build 30 lines of network.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from roar.models.base import ModelConfig
from roar.models.registry import MODELS


class ResNet8Config(ModelConfig):
    name: Literal["resnet8"] = "resnet8"
    widths: list[int] = Field(default_factory=lambda: [64, 128, 256], description="channels of the three stages")

    @field_validator("widths")
    @classmethod
    def _three_positive(cls, widths: list[int]) -> list[int]:
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError("needs three positive channel counts, e.g. [64, 128, 256]")
        return widths


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the (downsampled) input, → ReLU."""

    def __init__(self, channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet8(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths=(64, 128, 256)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, channels = [], widths[0]
        for width, stride in zip(widths, (1, 2, 2)):
            downsample = None
            if stride != 1 or channels != width:
                downsample = nn.Sequential(
                    nn.Conv2d(channels, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
                )
            stages.append(BasicBlock(channels, width, stride=stride, downsample=downsample))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


@MODELS.register("resnet8", ResNet8Config)
def build_resnet8(cfg: ResNet8Config, num_classes: int, geometry: tuple[int, ...]) -> nn.Module:
    return ResNet8(num_classes, geometry[0], tuple(cfg.widths))
