"""Perturbation curves without retraining: MoRF, LeRF and patch degradation, batched on the device.

For an image x with clean prediction c and a ranking of its positions by an attribution map, step s
replaces the k_s most relevant positions (MoRF, Samek et al. 2017), the k_s least relevant ones
(LeRF) or k_s positions in a fixed random order (the control), and runs the model on the result x̃.
What is measured on those outputs (accuracy, the probability of the clean prediction, its relative
change, …) is not decided here: the caller passes the measures, the curve measures registered in
``roar.metrics``. This layer sits below ``roar.metrics`` and cannot read that registry itself, and
the engine needs no more of a measure than its ``name`` and ``evaluate_batch``.

At each step every measure gets the same keywords (``labels``, ``indices``, ``maps``, ``clean`` and
``perturbed``: the softmax on the clean and on the perturbed images) and returns ``{name: values}``,
one value per image; the engine sums them over the images, so batches add up exactly (sums of the
same float32 per-image values, whatever the batch split of the sums' caller).

Positions are pixels (all channels together) or square patches (the PGIG degradation test):
patches are ranked by the channel-summed map average-pooled over each patch, and a patch is
replaced whole. Step 0 is always the clean image and step 1 already removes the top patch.

Rankings come from ``roar.perturb.ranking`` (seeded tie-break, exact counts, the one removal rule
``select``), fills from ``roar.perturb.fills``; with patches the fill's context carries ``patch``,
which ``patch_mean`` (each patch replaced by its own per-channel mean) needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from roar.core.device import autocast
from roar.perturb.fills import Fill, ablate
from roar.perturb.patches import patch_grid, patch_scores, to_pixels
from roar.perturb.ranking import count, ranks, select

ORDERS = ("morf", "lerf", "random")


# --------------------------------------------------------------------------------------------- positions


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
    return to_pixels(ranks(scores, indices, seed), patch, h, w), rows * cols


def removal_mask(position_ranks: torch.Tensor, k: int, n_positions: int, order: str) -> torch.Tensor:
    """True where replaced: the k top-ranked positions (``morf``, ``random``) or the k lowest (``lerf``)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return select(position_ranks, k, n_positions, "morf" if order == "random" else order)


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


# --------------------------------------------------------------------------------------------- measures


class StepMeasure(Protocol):
    """What the engine needs of a measure (``roar.metrics.CurveMeasure`` is one)."""

    name: str

    def evaluate_batch(self, **inputs: Any) -> Mapping[str, torch.Tensor]: ...


@dataclass
class CurveSums:
    """Running sums over images of each measure at each step of one (method, order) curve."""

    steps: list[Step]
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # measure name -> [steps], in the measures' order
    images: int = 0

    @classmethod
    def empty(cls, steps: list[Step], names: Sequence[str]) -> CurveSums:
        return cls(steps, {name: np.zeros(len(steps)) for name in names})

    def add(self, other: CurveSums) -> None:
        if list(other.sums) != list(self.sums):
            raise ValueError(f"cannot add the sums of {list(other.sums)} to those of {list(self.sums)}")
        for name, values in other.sums.items():
            self.sums[name] += values
        self.images += other.images

    def means(self) -> dict[str, np.ndarray]:
        n = max(self.images, 1)
        return {name: values / n for name, values in self.sums.items()}


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
    measures: Sequence[StepMeasure],
    seed: int,
    granularity: str = "pixel",
    patch: int = 9,
    clean: torch.Tensor | None = None,
    amp: bool = False,
) -> CurveSums:
    """One batch of one curve: ``images`` [B, C, H, W] in [0, 1] on the model's device, their
    ``labels`` and dataset ``indices`` [B], ``maps`` [B, H, W] (None for the random order), and the
    ``measures`` to sum (``roar.metrics.curve_measures()``).

    ``clean`` (the softmax on the clean images, [B, classes]) may be passed to save a forward pass
    when several curves share a batch. The fill sees the batch's ``indices`` so stochastic fills
    (ROAD's noise) draw the same values for an image whatever batch it is in.
    """
    h, w = images.shape[-2:]
    clean = softmax(model, images, amp) if clean is None else clean
    r, n_positions = position_ranks(maps, indices, seed, granularity, patch, (h, w))
    plan = plan_steps(steps, n_positions)
    sums = CurveSums.empty(plan, [m.name for m in measures])
    sums.images = len(images)
    context = {"indices": indices, **({"patch": patch} if granularity == "patch" else {})}
    for i, step in enumerate(plan):
        removed = removal_mask(r, step.k, n_positions, order).expand_as(images)
        probs = clean if step.k == 0 else softmax(model, ablate(images, removed, fill, **context), amp)
        for measure in measures:
            values = measure.evaluate_batch(labels=labels, indices=indices, maps=maps, clean=clean, perturbed=probs)
            if set(values) != {measure.name} or values[measure.name].shape != labels.shape:
                raise ValueError(
                    f"curve measure {measure.name!r} must return {{{measure.name!r}: one value per image}}, "
                    f"got { {k: tuple(v.shape) for k, v in values.items()} }"
                )
            sums.sums[measure.name][i] = values[measure.name].sum().item()
    return sums


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Area under a curve by the trapezoid rule over the fraction removed (not over the step index)."""
    return float(np.trapezoid(np.asarray(values, dtype=float), np.asarray(fractions, dtype=float)))
