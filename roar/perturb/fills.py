"""What replaces the removed positions: pluggable fills, selected by name.

A fill is a callable ``fill(images, removed, **context) -> Tensor`` on whole batches: ``images``
float [B, C, H, W] in [0, 1] (before normalisation, which the model does itself), ``removed`` bool
[B, C, H, W] (or broadcastable to it), True where the image is replaced. It returns an image-shaped
tensor whose values at removed positions are the replacements; ``ablate`` takes those and leaves
every other position bit-identical, so a fill may compute its candidate values everywhere.
``context`` carries optional per-batch information (e.g. ``indices``, a ``generator``) that a fill
may use and must otherwise ignore.

Built-in fills:

* ``mean``: the per-channel dataset mean in [0, 1] space, the fill of Hooker et al. (NeurIPS 2019)
  for ROAR and KAR. Applied before normalisation, it becomes 0 in the normalised input.
* ``zero``: black.
* ``blur``: the pixel's value in a Gaussian-blurred copy of the image (the perturbation of Fong &
  Vedaldi's meaningful perturbations), which removes fine detail without a flat, shape-revealing patch.
* ``patch_mean``: each patch replaced by its own per-channel mean (the PGIG degradation fill), for
  patch granularity: the fill's context must carry the ``patch`` size.
* ``road``: ROAD's noisy linear imputation (Rong, Leemann et al., ICML 2022; ``roar.perturb.road``):
  each removed pixel the weighted mean of its 8 neighbours, solved jointly, plus N(0, noise²) noise
  drawn per image from (seed, dataset index), so an image gets the same noise in any batch or loader.

Other fills (an inpainter) register themselves in ``FILLS`` with ``@FILLS.register(name,
ConfigClass)`` on a factory ``(cfg, mean=None) -> fill``; ``build_fill`` then builds them by name
like the built-ins.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import AfterValidator, Field, ValidationError

from roar.core.errors import RoarError
from roar.core.registry import Registry
from roar.core.schema import Section, Seed, format_validation_error, registered
from roar.perturb.patches import patch_grid, patch_scores, to_pixels
from roar.perturb.road import road_impute

Fill = Callable[..., torch.Tensor]

FILLS: Registry = Registry("fill")


def ablate(images: torch.Tensor, removed: torch.Tensor, fill: Fill, **context: Any) -> torch.Tensor:
    """``images`` with the ``removed`` positions replaced by ``fill``'s values; every other value unchanged."""
    if removed.dtype != torch.bool:
        raise ValueError(f"the removal mask must be bool, got {removed.dtype}")
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    removed = removed.to(images.device)
    filled = fill(images, removed, **context)
    return torch.where(removed, filled.to(images.dtype), images)


def _unit_values(values: list[float]) -> list[float]:
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError("needs one value in [0, 1] per channel (images are in [0, 1] before normalisation)")
    return values


ChannelValues = Annotated[list[float], AfterValidator(_unit_values)]
"""A value per channel in [0, 1] space (fills act before normalisation)."""


class FillSection(Section):
    """The config of a fill: ``name`` (its registered name, the tag of the ``fill`` union) and its parameters."""

    patches: ClassVar[bool] = False  # True: the fill replaces whole patches (patch granularity only)


# --------------------------------------------------------------------------------------------- mean, zero


class MeanFillConfig(FillSection):
    name: Literal["mean"] = "mean"
    mean: ChannelValues | None = Field(
        None, description="per-channel value in [0, 1]; default: the dataset's per-channel mean"
    )


class ConstantFill:
    """A fixed value per channel (broadcast over the image), in [0, 1] space."""

    def __init__(self, value: Sequence[float]):
        self.value = tuple(float(v) for v in value)

    def __call__(self, images: torch.Tensor, removed: torch.Tensor, **context: Any) -> torch.Tensor:
        c = images.shape[1]
        if len(self.value) not in (1, c):
            raise ValueError(f"the fill has {len(self.value)} channel values for images with {c} channels")
        value = torch.tensor(self.value, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return value.expand_as(images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value})"


@FILLS.register("mean", MeanFillConfig)
def build_mean(cfg: MeanFillConfig, mean: Sequence[float] | None = None) -> ConstantFill:
    value = cfg.mean if cfg.mean is not None else mean
    if value is None:
        raise RoarError("fill 'mean' needs the dataset's per-channel mean in [0, 1] (or fill.mean)")
    if not value or any(not 0.0 <= float(m) <= 1.0 for m in value):
        raise RoarError(f"fill 'mean': the mean must be per-channel values in [0, 1] space, got {tuple(value)}")
    return ConstantFill(value)


class ZeroFillConfig(FillSection):
    name: Literal["zero"] = "zero"


@FILLS.register("zero", ZeroFillConfig)
def build_zero(cfg: ZeroFillConfig, mean: Sequence[float] | None = None) -> ConstantFill:
    return ConstantFill((0.0,))


# --------------------------------------------------------------------------------------------- blur


class BlurFillConfig(FillSection):
    name: Literal["blur"] = "blur"
    sigma: float = Field(
        2.0, gt=0, description="Gaussian standard deviation in pixels (2 suits 32×32 images; scale it with the size)"
    )
    truncate: float = Field(4.0, gt=0, description="the kernel reaches int(truncate · sigma + 0.5) pixels each way")


@functools.lru_cache(maxsize=32)
def _blur_matrix(n: int, sigma: float, truncate: float) -> np.ndarray:
    """[n, n] float64 matrix M with (M @ x) = 1-D Gaussian filter of x, boundary mode 'reflect' of scipy.

    'reflect' extends a line by mirroring about the edge, repeating the edge value (d c b a | a b c d);
    folding the reflected taps into M makes the filter exact for any radius, even one larger than n.
    Weights and radius follow ``scipy.ndimage.gaussian_filter1d``.
    """
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    src = np.arange(n)[:, None] + offsets[None, :]  # [n, 2r+1]
    src = np.mod(src, 2 * n)
    src = np.where(src < n, src, 2 * n - 1 - src)
    matrix = np.zeros((n, n))
    np.add.at(matrix, (np.repeat(np.arange(n), len(offsets)), src.ravel()), np.tile(weights, n))
    return matrix


def gaussian_blur(images: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of every channel of [B, C, H, W] images, as ``scipy.ndimage.gaussian_filter``
    with ``mode='reflect'`` on each 2-D channel.

    Each axis is one matrix product with a small banded matrix that holds the reflected boundary:
    exact for any image size and radius, batched, and free of the TF32 convolutions CUDA may pick.
    """
    _, _, h, w = images.shape
    rows = torch.from_numpy(_blur_matrix(h, float(sigma), float(truncate))).to(images.device, images.dtype)
    cols = torch.from_numpy(_blur_matrix(w, float(sigma), float(truncate))).to(images.device, images.dtype)
    return torch.matmul(rows, torch.matmul(images, cols.T))


class BlurFill:
    def __init__(self, sigma: float = 2.0, truncate: float = 4.0):
        self.sigma = float(sigma)
        self.truncate = float(truncate)

    def __call__(self, images: torch.Tensor, removed: torch.Tensor, **context: Any) -> torch.Tensor:
        return gaussian_blur(images, self.sigma, self.truncate)

    def __repr__(self) -> str:
        return f"BlurFill(sigma={self.sigma}, truncate={self.truncate})"


@FILLS.register("blur", BlurFillConfig)
def build_blur(cfg: BlurFillConfig, mean: Sequence[float] | None = None) -> BlurFill:
    return BlurFill(cfg.sigma, cfg.truncate)


# --------------------------------------------------------------------------------------------- patch mean


class PatchMeanFillConfig(FillSection):
    name: Literal["patch_mean"] = "patch_mean"

    patches: ClassVar[bool] = True  # replaces whole patches: only for patch granularity


class PatchMeanFill:
    """Each patch replaced by its own per-channel mean (PGIG's degradation fill), in [0, 1] space.

    The patch size comes with the batch (context ``patch``), as the ranking's patches do. Every
    channel is replaced: the PGIG code skipped channels whose mean was ≤ 0 in the centred
    (normalised) space, leaving part of a "removed" patch intact.
    """

    def __call__(self, images: torch.Tensor, removed: torch.Tensor, **context: Any) -> torch.Tensor:
        patch = context.get("patch")
        if patch is None:
            raise ValueError("fill 'patch_mean' replaces whole patches: it needs patch granularity (context 'patch')")
        h, w = images.shape[-2:]
        means = patch_scores(images.flatten(0, 1), patch).view(*images.shape[:2], *patch_grid(h, w, patch))
        return to_pixels(means, patch, h, w).to(images.dtype)

    def __repr__(self) -> str:
        return "PatchMeanFill()"


@FILLS.register("patch_mean", PatchMeanFillConfig)
def build_patch_mean(cfg: PatchMeanFillConfig, mean: Sequence[float] | None = None) -> PatchMeanFill:
    return PatchMeanFill()


# --------------------------------------------------------------------------------------------- by name


FillConfig = registered(FILLS, FillSection)
"""A field holding any registered fill's config: ``{name: blur, sigma: 2}``, or a bare name (``road``)
for a fill with its defaults (read from the registry when validated, so later entries are valid)."""


def build_fill(spec: str | Section, mean: Sequence[float] | None = None, **params: Any) -> Fill:
    """A registered fill by name (``params`` validated against its config) or from its config section.

    ``mean`` is the dataset's per-channel mean in [0, 1] space; fills that do not need it ignore it.
    """
    if isinstance(spec, str):
        params.pop("name", None)
        try:
            cfg = FILLS.config_class(spec)(**params)
        except ValidationError as exc:
            raise RoarError(f"fill '{spec}': {format_validation_error(exc, params)}") from None
        name = spec
    else:
        if params:
            raise TypeError("pass parameters either in the config section or as keywords, not both")
        cfg, name = spec, spec.name
    if mean is not None:
        mean = tuple(float(m) for m in mean)
        if not all(math.isfinite(m) for m in mean):
            raise RoarError(f"fill '{name}': the dataset mean must be finite, got {mean}")
    return FILLS.create(name, cfg, mean=mean)


def list_fills() -> list[str]:
    return FILLS.names()


# --------------------------------------------------------------------------------------------- road


class RoadFillConfig(FillSection):
    name: Literal["road"] = "road"
    noise: float = Field(0.01, ge=0, description="standard deviation of the noise on imputed values ([0, 1] units)")
    fallback: ChannelValues | None = Field(
        None,
        description="per-channel value in [0, 1] for a channel removed entirely (nothing to impute from); "
        "default: the dataset's per-channel mean, else 0.5",
    )
    seed: Seed = Field(0, description="noise seed; an image's noise depends on it and its dataset index")
    numerics: Literal[2] = Field(
        2,
        description="the revision of the imputation's numbers (2: noise on imputed values only, exact "
        "routes); recorded with every result, so that results of an older revision are recomputed",
    )


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def noise_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s noise generator: a 63-bit hash of (seed, index)."""
    return _splitmix64(_splitmix64(seed) ^ (index & 0xFFFFFFFFFFFFFFFF)) >> 1


class RoadFill:
    """ROAD's noisy linear imputation as a fill (``roar.perturb.road.road_impute``).

    Each image's noise comes from its own generator seeded by (seed, dataset index) — the ``indices``
    of the context, or the batch positions without them — and the solve of an image does not depend
    on the rest of its batch, so an image is filled bit-identically in any batch, order, loader path
    or worker.
    """

    def __init__(self, noise: float = 0.01, fallback: Sequence[float] | None = None, seed: int = 0):
        self.noise = float(noise)
        self.fallback = tuple(float(v) for v in fallback) if fallback is not None else None
        self.seed = int(seed)

    def __call__(self, images: torch.Tensor, removed: torch.Tensor, **context: Any) -> torch.Tensor:
        # A mask shared by the channels stays a pixel mask: one system per image instead of one per channel.
        removed = (
            removed[:, 0] if removed.ndim == 4 and removed.shape[1] == 1 else torch.broadcast_to(removed, images.shape)
        )
        generators = None
        if self.noise > 0:
            indices = context.get("indices")
            rows = range(len(images)) if indices is None else torch.as_tensor(indices).reshape(-1).tolist()
            generators = [torch.Generator(images.device).manual_seed(noise_seed(self.seed, int(i))) for i in rows]
        return road_impute(images, removed, self.noise, generators, self.fallback)

    def __repr__(self) -> str:
        return f"RoadFill(noise={self.noise}, fallback={self.fallback}, seed={self.seed})"


@FILLS.register("road", RoadFillConfig)
def build_road(cfg: RoadFillConfig, mean: Sequence[float] | None = None) -> RoadFill:
    fallback = cfg.fallback if cfg.fallback is not None else mean
    if fallback is not None and (not fallback or any(not 0.0 <= float(v) <= 1.0 for v in fallback)):
        raise RoarError(f"fill 'road': the fallback must be per-channel values in [0, 1], got {tuple(fallback)}")
    return RoadFill(cfg.noise, fallback, cfg.seed)
