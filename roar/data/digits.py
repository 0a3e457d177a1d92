"""``digits``: scikit-learn's bundled handwritten digits, a real dataset that needs no download.

The 1,797 8×8 grey images (values 0..16) ship inside scikit-learn, so this dataset works
offline and builds in well under a second: real handwriting for tests and quick checks where the
procedural ``shapes`` would be too artificial. Images are upsampled bilinearly to ``image_size``
and, by default, replicated to three channels so the same RGB models apply. The train/test split
is stratified and deterministic in ``seed``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from roar.core.schema import Seed
from roar.data.base import Dataset, DatasetConfig, TensorSplit, channel_stats
from roar.data.registry import DATASETS

CLASS_NAMES = [str(d) for d in range(10)]


class DigitsConfig(DatasetConfig):
    name: Literal["digits"] = "digits"
    image_size: int = Field(32, ge=8, le=256, description="side of the upsampled square image")
    channels: Literal[1, 3] = Field(3, description="1: grey; 3: grey replicated to RGB")
    test_fraction: float = Field(0.2, ge=0.05, le=0.5, description="share of the 1,797 images held out, per class")
    seed: Seed = Field(0, description="seed of the stratified split")


def upsample(images: np.ndarray, size: int) -> torch.Tensor:
    """Grey 8×8 images with values 0..16 [N, 8, 8] → uint8 [N, 1, size, size], bilinear."""
    x = torch.as_tensor(images, dtype=torch.float32)[:, None] * (255.0 / 16.0)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


@DATASETS.register("digits", DigitsConfig)
def build_digits(cfg: DigitsConfig) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    labels = np.asarray(raw.target, dtype=np.int64)
    images = upsample(raw.images, cfg.image_size).expand(-1, cfg.channels, -1, -1).contiguous()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=cfg.test_fraction, stratify=labels, random_state=cfg.seed
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train = TensorSplit(images[train_idx], labels[train_idx])
    test = TensorSplit(images[test_idx], labels[test_idx])
    mean, std = channel_stats(train.images)
    return Dataset("digits", train, test, list(CLASS_NAMES), mean, std)
