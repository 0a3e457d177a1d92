"""Perturbation curves without retraining: MoRF, LeRF and patch degradation, batched on the device.

For an image x with clean prediction c and a ranking of its positions by an attribution map, step s
replaces the k_s most relevant positions (MoRF, Samek et al. 2017), the k_s least relevant ones
(LeRF) or k_s positions in a fixed random order (the control), and measures the model on the
result x̃: accuracy against the label, the softmax probability p_c(x̃) of the *clean* prediction,
and the relative change |p_c(x) − p_c(x̃)| / p_c(x) × 100 (the ROAR seed's LeRF measure).

Positions are pixels (all channels together) or square patches (the PGIG degradation test):
patches are ranked by the channel-summed map average-pooled over each patch, and a patch is
replaced whole. Step 0 is always the clean image and step 1 already removes the top patch.

Rankings come from ``roar.evaluation.ablation`` (seeded tie-break, exact counts), fills from
``roar.evaluation.fills`` plus ``patch_mean`` (each patch replaced by its own per-channel mean, in
[0, 1] space before normalisation, so no channel is skipped whatever the sign of its normalised mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from roar.device import autocast
from roar.evaluation.ablation import count, ranks
from roar.evaluation.fills import Fill, ablate

ORDERS = ("morf", "lerf", "random")
MEASURES = ("accuracy", "probability", "relative_change")


# --------------------------------------------------------------------------------------------- positions


def patch_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """Rows and columns of patches covering an image; edge patches may be smaller than ``patch``."""
    return math.ceil(height / patch), math.ceil(width / patch)


def patch_scores(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, H, W] maps → [B, 1, rows, cols]: the mean of the map over each patch (edge patches over
    their pixels inside the image, so a partial patch is not penalised for its missing pixels)."""
    b, h, w = maps.shape
    rows, cols = patch_grid(h, w, patch)
    pad = (0, cols * patch - w, 0, rows * patch - h)
    x = F.pad(maps[:, None].float(), pad)
    ones = F.pad(torch.ones(1, 1, h, w, device=maps.device), pad)
    return F.avg_pool2d(x, patch) / F.avg_pool2d(ones, patch)


def _to_pixels(per_patch: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """[B, C, rows, cols] → [B, C, H, W]: every pixel takes its patch's value."""
    return per_patch.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :height, :width]


def position_ranks(
    maps: torch.Tensor | None,
    indices: torch.Tensor,
    seed: int,
    granularity: str,
    patch: int,
    shape: tuple[int, int],
) -> tuple[torch.Tensor, int]:
    """(rank of every pixel's position [B, 1, H, W], number of positions P); rank 0 = most relevant.

    ``maps`` [B, H, W]; None ranks by the seeded tie-break alone: the random-order control. With
    patch granularity every pixel carries the rank of its patch and P is the number of patches.
    """
    h, w = shape
    b = len(indices)
    if granularity == "pixel":
        values = maps if maps is not None else torch.zeros(b, h, w, device=indices.device)
        return ranks(values, indices, seed), h * w
    if granularity != "patch":
        raise ValueError(f"granularity must be 'pixel' or 'patch', got {granularity!r}")
    rows, cols = patch_grid(h, w, patch)
    scores = patch_scores(maps, patch) if maps is not None else torch.zeros(b, 1, rows, cols, device=indices.device)
    return _to_pixels(ranks(scores, indices, seed), patch, h, w), rows * cols


def removal_mask(position_ranks: torch.Tensor, k: int, n_positions: int, order: str) -> torch.Tensor:
    """True where replaced: the k top-ranked positions (``morf``, ``random``) or the k lowest (``lerf``)."""
    if order in ("morf", "random"):
        return position_ranks < k
    if order == "lerf":
        return position_ranks >= n_positions - k
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


@dataclass(frozen=True)
class Step:
    step: int
    fraction: float  # share of positions (pixels or patches) replaced
    k: int  # positions replaced


def plan_steps(steps: Sequence[float] | int, n_positions: int) -> list[Step]:
    """Fractions → counts (rounded half up, exactly as ROAR counts); an int n → patches 0, 1, …, n."""
    if isinstance(steps, int):
        if steps > n_positions:
            raise ValueError(f"{steps} patch steps, but the image has only {n_positions} patches")
        return [Step(p, p / n_positions, p) for p in range(steps + 1)]
    return [Step(i, float(f), count(f, n_positions)) for i, f in enumerate(steps)]


# --------------------------------------------------------------------------------------------- fills


class PatchMeanFill:
    """Each patch replaced by its own per-channel mean (PGIG's degradation fill), in [0, 1] space.

    Every channel is replaced: the PGIG code skipped channels whose mean was ≤ 0 in the centred
    (normalised) space, leaving part of a "removed" patch intact.
    """

    def __init__(self, patch: int):
        self.patch = int(patch)

    def __call__(self, images: torch.Tensor, removed: torch.Tensor, **context: Any) -> torch.Tensor:
        h, w = images.shape[-2:]
        means = patch_scores(images.flatten(0, 1), self.patch).view(*images.shape[:2], *patch_grid(h, w, self.patch))
        return _to_pixels(means, self.patch, h, w).to(images.dtype)

    def __repr__(self) -> str:
        return f"PatchMeanFill({self.patch})"


# --------------------------------------------------------------------------------------------- measures


@dataclass
class CurveSums:
    """Running sums over images of each measure at each step of one (method, order) curve."""

    steps: list[Step]
    correct: np.ndarray
    probability: np.ndarray
    relative_change: np.ndarray
    images: int = 0

    @classmethod
    def empty(cls, steps: list[Step]) -> CurveSums:
        zeros = [np.zeros(len(steps)) for _ in range(3)]
        return cls(steps, *zeros)

    def add(self, other: CurveSums) -> None:
        self.correct += other.correct
        self.probability += other.probability
        self.relative_change += other.relative_change
        self.images += other.images

    def means(self) -> dict[str, np.ndarray]:
        n = max(self.images, 1)
        return {
            "accuracy": self.correct / n,
            "probability": self.probability / n,
            "relative_change": self.relative_change / n,
        }


@torch.no_grad()
def softmax(model: torch.nn.Module, images: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """The model's class probabilities (float32) on ``images``."""
    with autocast(images.device, amp):
        logits = model(images)
    return logits.float().softmax(1)


@torch.no_grad()
def curve_sums(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    maps: torch.Tensor | None,
    order: str,
    steps: Sequence[float] | int,
    fill: Fill,
    *,
    seed: int,
    granularity: str = "pixel",
    patch: int = 9,
    clean: torch.Tensor | None = None,
    amp: bool = False,
) -> CurveSums:
    """One batch of one curve: ``images`` [B, C, H, W] in [0, 1] on the model's device, their
    ``labels`` and dataset ``indices`` [B], ``maps`` [B, H, W] (None for the random order).

    ``clean`` (the softmax on the clean images, [B, classes]) may be passed to save a forward pass
    when several curves share a batch. The fill sees the batch's ``indices`` so stochastic fills
    (ROAD's noise) draw the same values for an image whatever batch it is in.
    """
    h, w = images.shape[-2:]
    clean = softmax(model, images, amp) if clean is None else clean
    predicted = clean.argmax(1)
    p_clean = clean.gather(1, predicted[:, None])[:, 0]
    r, n_positions = position_ranks(maps, indices, seed, granularity, patch, (h, w))
    plan = plan_steps(steps, n_positions)
    sums = CurveSums.empty(plan)
    sums.images = len(images)
    for i, step in enumerate(plan):
        removed = removal_mask(r, step.k, n_positions, order).expand_as(images)
        probs = clean if step.k == 0 else softmax(model, ablate(images, removed, fill, indices=indices), amp)
        p = probs.gather(1, predicted[:, None])[:, 0]
        sums.correct[i] = (probs.argmax(1) == labels).sum().item()
        sums.probability[i] = p.sum().item()
        sums.relative_change[i] = ((p_clean - p).abs() / p_clean.clamp_min(1e-12) * 100).sum().item()
    return sums


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Area under a curve by the trapezoid rule over the fraction removed (not over the step index)."""
    return float(np.trapezoid(np.asarray(values, dtype=float), np.asarray(fractions, dtype=float)))
