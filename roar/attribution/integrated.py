"""Path methods: Integrated Gradients (Sundararajan et al. 2017) and Expected Gradients
(Erion et al. 2021).

IG = (x − x′) ⊙ ∫₀¹ ∂f(x′ + α(x − x′))/∂x dα, approximated by a quadrature rule. All steps of
all images of a batch go through the engine as one flattened set of inputs, built chunk by chunk
so memory stays bounded by ``max_batch`` whatever the number of steps.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from roar.attribution.base import Attribution, EngineConfig
from roar.attribution.engine import input_gradients, max_batch_for
from roar.attribution.registry import register
from roar.core.errors import RoarError

Rule = Literal["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]


def quadrature(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points α in [0, 1] and weights summing to 1, as Captum defines each rule."""
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        alphas, weights = (x + 1) / 2, w / 2
    elif rule == "riemann_trapezoid":
        if steps < 2:
            raise RoarError("integrated_gradients.steps: the trapezoid rule needs at least 2 steps")
        alphas = np.linspace(0, 1, steps)
        weights = np.full(steps, 1 / (steps - 1))
        weights[[0, -1]] /= 2
    else:
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
        alphas = (np.arange(steps) + offset) / steps
        weights = np.full(steps, 1 / steps)
    return torch.tensor(alphas, dtype=torch.float32), torch.tensor(weights, dtype=torch.float32)


def baseline_for(kind: str | float, images: torch.Tensor, model) -> torch.Tensor:
    """The reference image x′: black, white, the dataset mean image (zero after normalisation), or a constant."""
    if kind == "black":
        return torch.zeros_like(images)
    if kind == "white":
        return torch.ones_like(images)
    if kind == "mean":
        mean = getattr(model, "mean", None)
        if mean is None:
            raise RoarError("baseline 'mean' needs a model with a normalisation mean (roar.models.Classifier)")
        return mean.view(1, -1, 1, 1).to(images).expand_as(images)
    return torch.full_like(images, float(kind))


def path_gradients(model, images, starts, alphas, weights, targets, max_batch: int) -> torch.Tensor:
    """Σ_s w_s ∂f(x′_s + α_s (x − x′_s))/∂x per image, for S path points per image.

    ``starts`` is [B, ...] (one reference per image) or [S, B, ...]; ``alphas`` and ``weights`` are
    [S] or [S, B]. The S×B inputs are flattened step-major and pushed through the engine in
    chunks that each build only their own inputs, so memory stays O(max_batch).
    """
    b = len(images)
    s = alphas.shape[0]
    alphas = alphas.to(images.device).view(s, 1).expand(s, b) if alphas.ndim == 1 else alphas.to(images.device)
    weights = weights.to(images.device).view(s, 1).expand(s, b) if weights.ndim == 1 else weights.to(images.device)
    total = torch.zeros_like(images, dtype=torch.float32)
    max_batch = max_batch_for(images.device, max_batch)
    steps_per_chunk = max(1, max_batch // max(b, 1))
    for s0 in range(0, s, steps_per_chunk):
        s1 = min(s0 + steps_per_chunk, s)
        start = starts[s0:s1] if starts.ndim == images.ndim + 1 else starts.unsqueeze(0)
        a = alphas[s0:s1].view(s1 - s0, b, *([1] * (images.ndim - 1)))
        inputs = (start + a * (images.unsqueeze(0) - start)).reshape(-1, *images.shape[1:])
        grads = input_gradients(model, inputs, targets.repeat(s1 - s0), max_batch=max_batch)
        w = weights[s0:s1].view(s1 - s0, b, *([1] * (images.ndim - 1)))
        total += (grads.view(s1 - s0, *images.shape) * w).sum(0)
    return total


class IntegratedGradientsConfig(EngineConfig):
    steps: int = Field(50, ge=1, le=10_000)
    baseline: Literal["black", "white", "mean"] | float = "black"
    rule: Rule = "gausslegendre"


def integrated_gradients(model, images, targets, p: IntegratedGradientsConfig) -> torch.Tensor:
    baseline = baseline_for(p.baseline, images, model)
    alphas, weights = quadrature(p.rule, p.steps)
    return (images - baseline) * path_gradients(model, images, baseline, alphas, weights, targets, p.max_batch)


@register
class IntegratedGradients(Attribution):
    """IG from a fixed baseline; completeness: Σ attributions ≈ f(x) − f(x′)."""

    name = "integrated_gradients"
    config = IntegratedGradientsConfig
    smoothable = True  # the ROAR paper's IG-SG, IG-SG², IG-VarGrad and PGIG's SG-IG

    @property
    def passes(self) -> int:
        return self.params.steps

    def attribute(self, model, images, targets, *, generator, context):
        return integrated_gradients(model, images, targets, self.params)


class ExpectedGradientsConfig(EngineConfig):
    samples: int = Field(50, ge=1, le=10_000, description="draws of (reference image, α) per image")


@register
class ExpectedGradients(Attribution):
    """E over references x′ from the training set and α ~ U(0, 1) of (x − x′) ⊙ ∂f(x′ + α(x − x′))/∂x.

    The references come from ``context.references`` (the extraction stage passes a seeded sample of
    training images); reference indices and α are drawn from the batch's generator.
    """

    name = "expected_gradients"
    config = ExpectedGradientsConfig
    # Not smoothable: it is already an average over random draws, and each draw needs references.
    needs = frozenset({"references"})

    @property
    def passes(self) -> int:
        return self.params.samples

    def attribute(self, model, images, targets, *, generator, context):
        refs = context.references
        if refs is None or len(refs) == 0:
            raise RoarError("expected_gradients needs reference images (context.references: training images)")
        s, b = self.params.samples, len(images)
        pick = torch.randint(0, len(refs), (s, b), generator=generator)
        alphas = torch.rand(s, b, generator=generator)
        starts = refs[pick.view(-1)].to(images).view(s, b, *images.shape[1:])
        total = torch.zeros_like(images, dtype=torch.float32)
        # Each draw has its own reference, so (x − x′) stays inside the average: chunk over draws.
        per_chunk = max(1, max_batch_for(images.device, self.params.max_batch) // max(b, 1))
        for s0 in range(0, s, per_chunk):
            s1 = min(s0 + per_chunk, s)
            start = starts[s0:s1]
            a = alphas[s0:s1].to(images.device).view(s1 - s0, b, *([1] * (images.ndim - 1)))
            inputs = (start + a * (images.unsqueeze(0) - start)).reshape(-1, *images.shape[1:])
            grads = input_gradients(model, inputs, targets.repeat(s1 - s0), max_batch=self.params.max_batch)
            total += ((images.unsqueeze(0) - start) * grads.view(s1 - s0, *images.shape)).sum(0)
        return total / s
