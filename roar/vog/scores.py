"""VoG scores from per-snapshot gradients, in bounded memory.

``VoG(x) = mean_p sqrt( mean_t (S_t,p − μ_p)² )``: the *population* standard deviation of each
pixel's gradient across the K snapshots, averaged over the pixels. The gradients of a whole
dataset ([K, N, H, W]) rarely fit in memory, so they are read in blocks of examples; each block
needs K × block × H × W floats at once, however large N grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

VARIANTS = ("vog", "vog_normalize", "vog_abs_normalize")
"""The score variants: raw VoG, standardised within each true class, and the magnitude of that."""


def default_stages(k: int) -> dict[str, list[int]]:
    """early / middle / late: consecutive thirds of the K snapshots; complete: all of them."""
    if k < 1:
        raise ValueError("VoG needs at least one snapshot")
    bounds = np.linspace(0, k, 4).round().astype(int)
    stages = {
        name: list(range(a, b)) for name, a, b in zip(("early", "middle", "late"), bounds[:-1], bounds[1:], strict=True)
    }
    stages = {name: idx for name, idx in stages.items() if idx}  # fewer than 3 snapshots: fewer stages
    return {**stages, "complete": list(range(k))}


def _block_rows(gradients: Any, k: int, budget_bytes: int) -> int:
    per_example = k * int(np.prod(gradients.shape[2:])) * 8  # float64 while reducing
    return max(1, budget_bytes // max(1, per_example))


def vog_scores(
    gradients: Any, snapshots: Sequence[int] | None = None, *, budget_bytes: int = 256 * 2**20
) -> np.ndarray:
    """[K, N, H, W] gradients (a numpy array, an h5py dataset, or anything sliceable as
    ``gradients[k, a:b]``) → VoG [N] (float64), using only the ``snapshots`` listed (default: all).

    Memory stays under about ``budget_bytes`` whatever N is: examples are processed in blocks.
    """
    k_all, n = int(gradients.shape[0]), int(gradients.shape[1])
    chosen = list(range(k_all)) if snapshots is None else [int(s) for s in snapshots]
    if not chosen:
        raise ValueError("VoG needs at least one snapshot")
    if any(not 0 <= s < k_all for s in chosen):
        raise ValueError(f"snapshot positions {chosen} outside 0..{k_all - 1}")
    rows = _block_rows(gradients, len(chosen), budget_bytes)
    out = np.empty(n, dtype=np.float64)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        block = np.stack([np.asarray(gradients[s, a:b], dtype=np.float64) for s in chosen])  # [K, rows, ...]
        std = block.std(axis=0)  # population std (ddof=0) per pixel
        out[a:b] = std.reshape(b - a, -1).mean(axis=1)
    return out


def class_normalize(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(VoG − μ_c) / σ_c within each true class c of the analysed split (σ_c population std;
    a class whose scores are all equal gets 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    out = np.zeros_like(scores)
    for c in np.unique(labels):
        sel = labels == c
        std = scores[sel].std()
        out[sel] = (scores[sel] - scores[sel].mean()) / std if std > 0 else 0.0
    return out


def vog_variants(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """{variant: [N]} for ``VARIANTS``: the raw scores, ``class_normalize``d, and its absolute value."""
    normalized = class_normalize(scores, labels)
    return dict(zip(VARIANTS, (np.asarray(scores, dtype=np.float64), normalized, np.abs(normalized)), strict=True))
