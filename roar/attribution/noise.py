"""Noise tunnels: SmoothGrad (Smilkov et al. 2017), SmoothGrad² and VarGrad (Adebayo et al. 2018)
over any method that can be smoothed.

A tunnel is composed in the config rather than picked from a list of combinations::

    {name: noise_tunnel, base: integrated_gradients, statistic: vargrad, base_params: {steps: 16}}

``base`` is any registered method that declares ``smoothable = True`` (its map is a deterministic
function of the input computed from input gradients: gradient, grad×input, integrated gradients,
guided backprop, and whatever is registered later with the flag), ``base_params`` its parameters,
validated as strictly as the method's own (its ``max_batch`` is the tunnel's), ``statistic`` the
summary over the noisy copies. Grad-CAM (a layer's map), expected gradients (already an average
over random draws, and needing references) and the model-free controls are not smoothable.

The ROAR paper's grid {gradient, IG, guided backprop} × {SG, SG², VarGrad} and PGIG's SG-IG keep
their names (``ALIASES``): each is a tunnel with a fixed base and statistic and the flat
parameters it always had (``{name: ig_vargrad, steps: 16}``), computing exactly the map of the
composed tunnel it stands for, with the same shared passes and random stream.

Each of n copies gets its own independent noise around the clean image, x + N(0, σ²) with
σ = 0.15 · (max(x) − min(x)) per image (never noise added to already noisy input). The base
attributions of the copies are summarised by streaming mean and variance (Chan's parallel update
in float32), so VarGrad is never negative, and the three statistics of one base come from the
same noisy passes: requested together they share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from roar.attribution.base import Attribution, Context, EngineConfig
from roar.attribution.engine import max_batch_for
from roar.attribution.integrated import Rule
from roar.attribution.registry import METHODS, register, smoothable_methods
from roar.core.registry import closest


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


Statistic = Literal["smoothgrad", "smoothgrad_sq", "vargrad"]

STATISTICS: dict[str, str] = {
    "smoothgrad": "mean of the base attribution over noisy copies",
    "smoothgrad_sq": "mean of the squared base attribution over noisy copies (SG²)",
    "vargrad": "variance of the base attribution over noisy copies",
}

# Keys of the tunnel itself; everything else of an alias's flat parameters belongs to the base.
_TUNNEL_KEYS = ("samples", "sigma", "max_batch")


class NoiseConfig(EngineConfig):
    samples: int = Field(25, ge=1, le=10_000, description="noisy copies per image")
    sigma: float = Field(0.15, ge=0, description="noise std as a fraction of each image's value range")


class NoiseTunnelConfig(NoiseConfig):
    """A tunnel over any smoothable method; ``base_params`` is validated against the base's own schema."""

    base: str = Field("gradient", description="the smoothable method applied to each noisy copy")
    statistic: Statistic = Field("smoothgrad", description="summary over the copies: mean, mean square, variance")
    base_params: dict[str, Any] = Field(
        default_factory=dict, description="the base's parameters (its max_batch is the tunnel's own)"
    )

    @model_validator(mode="after")
    def _base_is_smoothable_and_its_params_valid(self) -> NoiseTunnelConfig:
        smoothable = smoothable_methods()
        if self.base not in smoothable:
            known = self.base in METHODS
            raise PydanticCustomError(
                "not_smoothable",
                "{problem}{hint}; smoothable methods: {names}",
                {
                    "key": "base",
                    "problem": f"'{self.base}' cannot be smoothed by a noise tunnel"
                    if known
                    else f"unknown attribution method '{self.base}'",
                    "hint": "" if known else closest(self.base, smoothable),
                    "names": ", ".join(smoothable),
                },
            )
        if "max_batch" in self.base_params:
            raise PydanticCustomError(
                "tunnel_key",
                "the tunnel's max_batch is its base's: set it next to 'base', not in base_params",
                {"key": "base_params.max_batch"},
            )
        try:
            params = METHODS.config_class(self.base).model_validate(self.base_params)
        except ValidationError as exc:
            raise _under("base_params", exc) from None
        # Every default spelt out: equal tunnels have equal parameters, keys and store identities.
        self.base_params = params.model_dump(exclude={"max_batch"})
        return self


def _under(key: str, error: ValidationError) -> ValidationError:
    """``error`` with every location moved under ``key``, so that messages name ``base_params.steps``."""
    details = [
        {
            "type": PydanticCustomError(item["type"], item["msg"], item.get("ctx")),
            "loc": (key, *item["loc"]),
            "input": item["input"],
        }
        for item in error.errors()
    ]
    return ValidationError.from_exception_data(error.title, details)


@register
class NoiseTunnel(Attribution):
    """``statistic`` of ``base`` over noisy copies of each image (SmoothGrad, SmoothGrad², VarGrad)."""

    name = "noise_tunnel"
    config = NoiseTunnelConfig

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.tunnel = self.composition()
        fields = METHODS.config_class(self.tunnel.base).model_fields
        engine = {"max_batch": self.tunnel.max_batch} if "max_batch" in fields else {}
        self.base = METHODS.create(self.tunnel.base, **self.tunnel.base_params, **engine)  # the base method

    def composition(self) -> NoiseTunnelConfig:
        """The tunnel this method computes: its own parameters here, a fixed definition for an alias."""
        return self.params

    @property
    def passes(self) -> int:
        return self.tunnel.samples * self.base.passes

    def shared_key(self):
        # Flat (samples, sigma and the base's parameters side by side), as the aliases have always
        # keyed them: the key also seeds the extraction's random stream.
        own = {"samples": self.tunnel.samples, "sigma": self.tunnel.sigma}
        flat = {(f"base.{k}" if k in own else k): v for k, v in self.tunnel.base_params.items()}
        return ("noise", self.tunnel.base, tuple(sorted({**flat, **own}.items())))

    def compute_shared(self, model, images, targets, *, generator=None, context=None) -> Moments:
        b = len(images)
        samples = self.tunnel.samples
        sigma = noise_sigma(images, self.tunnel.sigma)
        # Copies per block: a block of k copies of every image is one engine call of k·B inputs.
        max_batch = max_batch_for(images.device, self.tunnel.max_batch)
        per_block = max(1, max_batch // max(b * self.base.passes, 1))
        moments = Moments()
        for s0 in range(0, samples, per_block):
            k = min(per_block, samples - s0)
            noise = torch.randn((k, *images.shape), generator=generator).to(images.device)
            noisy = (images.unsqueeze(0) + noise * sigma.unsqueeze(0)).reshape(k * b, *images.shape[1:])
            # The copies are no dataset examples: the base gets no context (smoothable methods need none).
            maps = self.base.attribute(model, noisy, targets.repeat(k), generator=generator, context=Context())
            moments.update(maps.view(k, *images.shape))
        return moments

    def from_shared(self, shared: Moments, images):
        if self.tunnel.statistic == "smoothgrad":
            return shared.mean
        if self.tunnel.statistic == "smoothgrad_sq":
            return shared.variance + shared.mean.square()
        return shared.variance


# ---------------------------------------------------------------------------------------------- aliases


class IGNoiseConfig(NoiseConfig):
    steps: int = Field(50, ge=1, le=10_000)
    baseline: Literal["black", "white", "mean"] | float = "black"
    rule: Rule = "gausslegendre"


class SmoothGradIGConfig(IGNoiseConfig):
    """The PGIG paper's setting: 25 IG steps on each of 25 noisy copies."""

    samples: int = Field(25, ge=1, le=10_000)
    steps: int = Field(25, ge=1, le=10_000)


class TunnelAlias(NoiseTunnel):
    """A named tunnel: fixed ``base_name`` and ``statistic``, flat parameters (the base's beside the tunnel's)."""

    base_name: ClassVar[str]
    statistic: ClassVar[str]
    config = NoiseConfig

    def composition(self) -> NoiseTunnelConfig:
        flat = self.params.model_dump()
        return NoiseTunnelConfig(
            base=self.base_name,
            statistic=self.statistic,
            base_params={k: v for k, v in flat.items() if k not in _TUNNEL_KEYS},
            **{k: flat[k] for k in _TUNNEL_KEYS},
        )


def _alias(name: str, base: str, statistic: str, config: type[NoiseConfig], doc: str) -> type[TunnelAlias]:
    attrs = {"name": name, "base_name": base, "statistic": statistic, "config": config, "__doc__": doc}
    return register(type(name, (TunnelAlias,), attrs))


_PREFIXES = {
    "": ("gradient", NoiseConfig),
    "ig_": ("integrated_gradients", IGNoiseConfig),
    "gb_": ("guided_backprop", NoiseConfig),
}

ALIASES: dict[str, type[TunnelAlias]] = {
    prefix + statistic: _alias(prefix + statistic, base, statistic, config, f"{base}: {doc}")
    for prefix, (base, config) in _PREFIXES.items()
    for statistic, doc in STATISTICS.items()
}
ALIASES["sg_ig"] = _alias(
    "sg_ig", "integrated_gradients", "smoothgrad", SmoothGradIGConfig, "SmoothGrad over IG (PGIG's SG-IG)"
)
