"""Row-wise sorts and ranks, the inner loop of the rank-based metrics and similarities.

On the CPU, NumPy's sorts (SIMD-accelerated, x86-simd-sort) sort rows of a few thousand floats
about ten times faster than ``torch.sort``; on other devices the data stays where it is and torch
sorts it. Both give the same sorted values; the order among equal values is unspecified, so every
caller here depends on the values or on ranks that treat ties alike, never on which of two tied
positions comes first (``roar.perturb.ranking`` breaks ties explicitly and sorts with torch).
"""

from __future__ import annotations

import numpy as np
import torch


def _on_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.int64, torch.int32)


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of [B, N] sorted ascending (values only)."""
    if _on_cpu(x):
        return torch.from_numpy(np.sort(x.detach().numpy(), axis=1))
    return x.sort(dim=1).values


def row_order(x: torch.Tensor) -> torch.Tensor:
    """int64 [B, N]: the positions of each row of [B, N] in ascending order of their values."""
    if _on_cpu(x):
        return torch.from_numpy(np.argsort(x.detach().numpy(), axis=1).astype(np.int64, copy=False))
    return x.argsort(dim=1)


def twice_average_ranks(x: torch.Tensor) -> torch.Tensor:
    """int64 [B, N]: twice the 1-based rank of every value of each row of [B, N], ascending, tied
    values sharing the mean of the ranks they span (scipy's ``rankdata(method="average")``).

    A run of equal values at sorted positions l … r − 1 spans the ranks l + 1 … r, whose mean is
    (l + r + 1) / 2: twice it is an integer, so the ranks are exact and sums of them too.
    """
    b, n = x.shape
    order = row_order(x).to(x.device)
    ordered = x.gather(1, order)
    positions = torch.arange(n, device=x.device).expand(b, n)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, positions, 0).cummax(1).values
    stop = torch.where(ends, positions + 1, n).flip(1).cummin(1).values.flip(1)
    return torch.empty_like(order).scatter_(1, order, first + stop + 1)
