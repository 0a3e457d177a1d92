"""Noise tunnels: SmoothGrad (Smilkov et al. 2017), SmoothGrad² and VarGrad (Adebayo et al. 2018)
over a base method: the ROAR paper's grid {gradient, IG, guided backprop} × {SG, SG², VarGrad}.

Each of n copies gets its own independent noise around the clean image, x + N(0, σ²) with
σ = 0.15 · (max(x) − min(x)) per image (never noise added to already noisy input). The base
attributions of the copies are summarised by streaming mean and variance (Chan's parallel update
in float32), so VarGrad is never negative, and the three statistics of one base come from the
same noisy passes: requested together they share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from roar.attribution.base import Attribution, EngineConfig
from roar.attribution.engine import input_gradients, max_batch_for
from roar.attribution.integrated import IntegratedGradientsConfig, Rule, integrated_gradients
from roar.attribution.registry import register


@dataclass
class Moments:
    """Streaming mean and sum of squared deviations over samples (Chan et al.)."""

    count: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def update(self, block: torch.Tensor) -> None:
        """Merge a block of samples [k, ...]."""
        k = block.shape[0]
        block = block.float()
        mean_b = block.mean(dim=0)
        # Two passes (mean, then squared deviations): as stable as var_mean and, on the CPU, far faster.
        m2_b = (block - mean_b).square().sum(dim=0)
        if self.count == 0:
            self.count, self.mean, self.m2 = k, mean_b, m2_b
            return
        n = self.count
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (k / (n + k))
        self.m2 = self.m2 + m2_b + delta.square() * (n * k / (n + k))
        self.count = n + k

    @property
    def variance(self) -> torch.Tensor:
        return (self.m2 / self.count).clamp_min(0)


def noise_sigma(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """σ per image: ``sigma`` × the image's value range, shaped to broadcast over [B, C, H, W]."""
    flat = images.flatten(1)
    return (sigma * (flat.max(1).values - flat.min(1).values)).view(-1, *([1] * (images.ndim - 1)))


class NoiseConfig(EngineConfig):
    samples: int = Field(25, ge=1, le=10_000, description="noisy copies per image")
    sigma: float = Field(0.15, ge=0, description="noise std as a fraction of each image's value range")


class IGNoiseConfig(NoiseConfig):
    steps: int = Field(50, ge=1, le=10_000)
    baseline: Literal["black", "white", "mean"] | float = "black"
    rule: Rule = "gausslegendre"


class NoiseTunnel(Attribution):
    """Base class: ``base`` names the attribution of each noisy copy, ``statistic`` the summary."""

    base: ClassVar[str]
    statistic: ClassVar[str]
    config = NoiseConfig

    @property
    def passes(self) -> int:
        steps = getattr(self.params, "steps", 1)
        return self.params.samples * steps

    def shared_key(self):
        p = self.params.model_dump(exclude={"max_batch"})
        return ("noise", self.base, tuple(sorted(p.items())))

    def _base(self, model, noisy, targets):
        if self.base == "gradient":
            return input_gradients(model, noisy, targets, max_batch=self.params.max_batch)
        if self.base == "guided_backprop":
            from roar.attribution.guided import guided_relu

            return input_gradients(model, noisy, targets, max_batch=self.params.max_batch, rules=guided_relu)
        p = IntegratedGradientsConfig(
            steps=self.params.steps,
            baseline=self.params.baseline,
            rule=self.params.rule,
            max_batch=self.params.max_batch,
        )
        return integrated_gradients(model, noisy, targets, p)

    def compute_shared(self, model, images, targets, *, generator=None, context=None) -> Moments:
        b = len(images)
        sigma = noise_sigma(images, self.params.sigma)
        # Copies per block: a block of k copies of every image is one engine call of k·B inputs.
        max_batch = max_batch_for(images.device, self.params.max_batch)
        per_block = max(1, max_batch // max(b * getattr(self.params, "steps", 1), 1))
        moments = Moments()
        for s0 in range(0, self.params.samples, per_block):
            k = min(per_block, self.params.samples - s0)
            noise = torch.randn((k, *images.shape), generator=generator).to(images.device)
            noisy = (images.unsqueeze(0) + noise * sigma.unsqueeze(0)).reshape(k * b, *images.shape[1:])
            moments.update(self._base(model, noisy, targets.repeat(k)).view(k, *images.shape))
        return moments

    def from_shared(self, shared: Moments, images):
        if self.statistic == "mean":
            return shared.mean
        if self.statistic == "mean_square":
            return shared.variance + shared.mean.square()
        return shared.variance


def _tunnel(name: str, base: str, statistic: str, config=NoiseConfig, doc: str = ""):
    cls = type(
        name, (NoiseTunnel,), {"name": name, "base": base, "statistic": statistic, "config": config, "__doc__": doc}
    )
    return register(cls)


_STATS = {
    "smoothgrad": ("mean", "mean of the base attribution over noisy copies"),
    "smoothgrad_sq": ("mean_square", "mean of the squared base attribution over noisy copies (SG²)"),
    "vargrad": ("variance", "variance of the base attribution over noisy copies"),
}
_BASES = {
    "": ("gradient", NoiseConfig),
    "ig_": ("integrated_gradients", IGNoiseConfig),
    "gb_": ("guided_backprop", NoiseConfig),
}

TUNNELS = {
    prefix + stat: _tunnel(prefix + stat, base, statistic, config, f"{base}: {doc}")
    for prefix, (base, config) in _BASES.items()
    for stat, (statistic, doc) in _STATS.items()
}


class SmoothGradIGConfig(IGNoiseConfig):
    """The PGIG paper's setting: 25 IG steps on each of 25 noisy copies."""

    samples: int = Field(25, ge=1, le=10_000)
    steps: int = Field(25, ge=1, le=10_000)


SmoothGradIG = _tunnel("sg_ig", "integrated_gradients", "mean", SmoothGradIGConfig, "SmoothGrad over IG (PGIG's SG-IG)")
