"""ResNet8 as in the ROAR seed (CIFAR-10 style).

Stem conv3×3 → 64, then one BasicBlock per stage at 64/128/256 channels with strides 1/2/2,
global average pooling and a linear classifier: ≈1.2 M parameters at the seed's widths. The
widths are configurable so that the CPU demo can use a narrower network.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from torch import nn
from torchvision.models.resnet import BasicBlock

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
