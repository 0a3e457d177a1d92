"""Robustness: how much a method's map moves when the input moves a little (lower is better).

Yeh et al. ("On the (in)fidelity and sensitivity of explanations", NeurIPS 2019) define the
sensitivity of an explanation as its largest change within a small ball around the input; Quantus
(``MaxSensitivity``, ``AvgSensitivity``) estimates it by sampling, as here:

* the input x is perturbed ``samples`` times by uniform noise in [−``radius``, ``radius``] on every
  element (Quantus's ``batch_uniform_noise`` with its default ``lower_bound`` 0.2; not clipped to
  [0, 1], as there);
* the map of each perturbed input x̃ is recomputed by ``explain``, the method as the stage binds
  it (``roar.attribution.explainer``: the same target, reduced over channels as the stored maps);
* each sample's value is ‖m(x̃) − m(x)‖_F / ‖m(x)‖_F, Quantus's defaults (``difference`` and
  ``fro_norm`` for both norms, no ``abs``, no normalisation), with m(x) the stored map;
* ``max_sensitivity`` is the maximum over the samples, ``avg_sensitivity`` the mean.

The relative change of an all-zero map m(x) is measured against the perturbed map instead: 0 when
it stays zero, 1 (all of itself) when it appears from nothing, where Quantus divides by zero. Values
stay finite, which ``roar metrics`` requires. Stored maps are float16 quotients of their maximum
(``roar.store.format``): even a perfectly robust method measures up to about 5e-4 against them.

Each image's noise comes from its own generator, seeded by (``seed``, its dataset index), so an
image's value does not depend on its batch. Quantus draws 200 samples; the default budget of 10
estimates the mean less precisely and can only underestimate the maximum, which more samples raise.
The method runs once per sample on the whole batch, with the same generator every time: only the
input changes between samples.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from roar.metrics.base import Metric, MetricConfig, register
from roar.metrics.randomisation import Explain
from roar.perturb.fills import noise_seed


class SensitivityConfig(MetricConfig):
    radius: float = Field(0.2, gt=0, description="noise is uniform in [-radius, radius] per element (Quantus: 0.2)")
    samples: int = Field(10, ge=1, description="perturbed inputs per image (Quantus: 200)")
    seed: int = Field(0, ge=0, description="seed of each image's noise, with its dataset index")


def uniform_noise(images: torch.Tensor, indices: torch.Tensor, samples: int, radius: float, seed: int) -> torch.Tensor:
    """[B, samples, C, H, W] noise, uniform in [−radius, radius], each image's from its own generator."""
    draws = [
        torch.rand((samples, *images.shape[1:]), generator=torch.Generator().manual_seed(noise_seed(seed, int(i))))
        for i in indices.tolist()
    ]
    noise = (torch.stack(draws) * 2 - 1) * radius
    return noise.to(device=images.device, dtype=images.dtype)


def relative_change(maps: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """‖perturbed − maps‖_F / ‖maps‖_F per image of [B, H, W]; an all-zero map is measured against
    the perturbed one (0 if it stays zero, else 1)."""
    maps, perturbed = maps.double().flatten(1), perturbed.double().flatten(1)
    change = torch.linalg.vector_norm(perturbed - maps, dim=1)
    scale = torch.linalg.vector_norm(maps, dim=1)
    scale = torch.where(scale > 0, scale, torch.linalg.vector_norm(perturbed, dim=1))
    return change / torch.where(scale > 0, scale, torch.ones_like(scale))


def sensitivities(
    *, maps: torch.Tensor, explain: Explain, model: nn.Module, images, targets, indices, config: SensitivityConfig
) -> torch.Tensor:
    """[B, samples] relative changes of the maps under the seeded noise."""
    noise = uniform_noise(images, indices, config.samples, config.radius, config.seed)
    changes = [relative_change(maps, explain(model, images + noise[:, i], targets)) for i in range(config.samples)]
    return torch.stack(changes, 1)


class _Sensitivity(Metric):
    """The largest or mean relative change of the map under small input noise; ``aggregate`` says which."""

    direction = "lower"
    needs = frozenset({"model", "maps", "explain"})
    config = SensitivityConfig
    aggregate: ClassVar[str]

    def evaluate_batch(
        self, *, model: nn.Module, maps: torch.Tensor, explain: Explain, images, targets, indices, **_: Any
    ) -> dict[str, torch.Tensor]:
        changes = sensitivities(
            maps=maps, explain=explain, model=model, images=images, targets=targets, indices=indices, config=self.params
        )
        values = changes.amax(1) if self.aggregate == "max" else changes.mean(1)
        return {self.name: values.float()}


@register
class MaxSensitivity(_Sensitivity):
    """max over samples of ‖m(x̃) − m(x)‖_F / ‖m(x)‖_F (Yeh et al. 2019; Quantus ``MaxSensitivity``)."""

    name = "max_sensitivity"
    title = "Max-sensitivity"
    aggregate = "max"


@register
class AvgSensitivity(_Sensitivity):
    """mean over samples of ‖m(x̃) − m(x)‖_F / ‖m(x)‖_F (Yeh et al. 2019; Quantus ``AvgSensitivity``)."""

    name = "avg_sensitivity"
    title = "Avg-sensitivity"
    aggregate = "mean"
