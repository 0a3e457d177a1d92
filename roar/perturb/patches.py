"""Square patches as positions: the PGIG degradation test ranks and replaces whole patches.

A patch's relevance is the mean of the (channel-summed) map over it; edge patches, which may be
smaller than the patch size, are averaged over their pixels inside the image so that a partial
patch is not penalised for its missing pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patch_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """Rows and columns of patches covering an image; edge patches may be smaller than ``patch``."""
    return math.ceil(height / patch), math.ceil(width / patch)


def patch_scores(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, H, W] maps → [B, 1, rows, cols]: the mean of the map over each patch (edge patches over
    their pixels inside the image)."""
    b, h, w = maps.shape
    rows, cols = patch_grid(h, w, patch)
    pad = (0, cols * patch - w, 0, rows * patch - h)
    x = F.pad(maps[:, None].float(), pad)
    ones = F.pad(torch.ones(1, 1, h, w, device=maps.device), pad)
    return F.avg_pool2d(x, patch) / F.avg_pool2d(ones, patch)


def to_pixels(per_patch: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """[B, C, rows, cols] → [B, C, H, W]: every pixel takes its patch's value."""
    return per_patch.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :height, :width]
