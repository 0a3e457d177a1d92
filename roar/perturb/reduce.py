"""From a raw map [B, C, H, W] to what is ranked: one value per pixel, or per element.

The ROAR original squares attributions before ranking (``sum_squares``, the default); other
papers sum absolute values or take the channel maximum. ``none`` keeps the channels, for
element-wise ranking. Which one was used is recorded in the store.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("sum_squares", "sum_abs", "max_abs", "none")


def reduce_map(maps: torch.Tensor, how: str, channels: int) -> torch.Tensor:
    """[B, C|1, H, W] → [B, H, W], or [B, channels, H, W] for ``none`` (one-channel maps repeated)."""
    if how == "sum_squares":
        return maps.float().square().sum(1)
    if how == "sum_abs":
        return maps.float().abs().sum(1)
    if how == "max_abs":
        return maps.float().abs().amax(1)
    if how == "none":
        return maps.float().expand(-1, channels, -1, -1) if maps.shape[1] == 1 else maps.float()
    raise ValueError(f"unknown reduction '{how}'; known: {', '.join(REDUCTIONS)}")
