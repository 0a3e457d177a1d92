"""Degraded oracles: explanations of known, graded quality between ``ground_truth`` and ``random``.

On datasets with object masks the labelled object is the perfect explanation and noise the worst.
To tell which *metric* can be trusted, roar needs explanations whose quality is known by
construction in between; a metric that cannot rank them in their known order cannot be trusted to
rank real methods. Each method below degrades the oracle (``controls.oracle_mask``: 1 on the
object, 0 elsewhere) by one parameter, and the parameter at 0 gives the oracle back bit for bit:

* ``oracle_blur`` (``sigma`` = 2 pixels): the oracle blurred by a Gaussian, exactly
  ``scipy.ndimage.gaussian_filter(oracle, sigma)`` with scipy's defaults (``mode="reflect"``,
  ``truncate=4``). The map is continuous, so the ranking inside the object is kept (its centre
  first) and mass spreads outside. ``reflect`` conserves the map's total mass (|object|), so what
  leaves the object is exactly what lands outside it.
* ``oracle_dilate`` (``radius`` = 2 pixels): the oracle dilated by a disk, exactly
  ``scipy.ndimage.binary_dilation(oracle, structure=disk)`` with the Euclidean disk
  {(dy, dx): dy² + dx² ≤ radius²} (radius 1: the 4-connected cross). The ring is 1 like the
  object, on purpose: an explanation that cannot tell the object from its surroundings; the top
  pixels include the ring, and the order among them is the metric's tie-break.
* ``oracle_shuffle`` (``fraction`` = 0.5, ``seed`` = 0): k = min(⌊fraction · |O| + ½⌋, |B|) object
  pixels exchange their value with k background pixels (|O|, |B|: object and background sizes).
  One seeded permutation of the image's pixels per image, from (``seed``, the image's dataset
  index in ``context.indices``), picks them: the first k object pixels and the first k background
  pixels in its order. Exchanged pixels keep their values (a moved pixel is as relevant as an
  object pixel, not diluted), so exactly k of the |O| units of relevance land off the object, and
  for one seed a larger fraction moves a superset of the pixels.
* ``oracle_noise`` (``noise`` = 0.5, ``seed`` = 0): the oracle plus Gaussian noise of standard
  deviation ``noise`` times the oracle's range (1, or 0 for an image that is all object or all
  background), drawn per image like the shuffle. Its known quantity is not a mass but a ranking:
  a background pixel outranks an object pixel with probability Φ(−1 / (noise · √2)).

Without dataset indices (a direct call with no context) an image's random key is drawn from the
batch's generator (``perturbation.image_keys``), as for meaningful perturbation; extraction always
passes indices, so an image gets the same map in any batch.

The known order. Let s(map) = Σ_object map / Σ map, the share of the map's mass on the object.

1. Parameter 0 is the oracle, s = 1; blur, dilation and shuffle have s ≤ 1 (their values lie in
   [0, 1], so the mass on the object is at most |O| and their total mass at least that).
2. Within a family s does not increase with the parameter: dilation, s = |O| / |dilate_r(O)|,
   disks nest; shuffle, s = 1 − k / |O| exactly; blur, the reflect-mode filter is symmetric and
   diagonal in the cosine basis, so s is a weighted mean of the kernel's cosine transform, which
   falls with sigma for a Gaussian (up to 5e-5 from truncating the kernel at 4 sigma, checked
   numerically for sigma in (0, 20)).
3. Across families, ``ground_truth`` ≥ ``oracle_blur`` ≥ ``oracle_shuffle`` ≥ ``random`` holds
   when (a) the object is thick compared with sigma: blur loses about (perimeter / area) · sigma
   / √(2π) of the mass (0.8 · sigma / R for a disk of radius R), which must not exceed
   ``fraction`` (defaults: R ≥ 3.2 pixels); and (b) the object covers less than 1 − fraction of
   the image, since random's share is about |O| / (H·W) (in expectation only: it is noise).
   ``oracle_dilate`` sits below ``ground_truth`` with s = |O| / |dilate_r(O)|; against blur and
   shuffle it depends on the shape, as blur does. ``oracle_noise`` is not in the mass order (its
   expected mass is the oracle's); it is ordered by ``noise`` through the probability above.

On the built-in ``shapes`` (32 × 32, 1000 test images of seed 0) the defaults give mean shares 1
(oracle), 0.69 (blur), 0.57 (dilate), 0.50 (shuffle), 0.16 (random); the chain of 3. holds on
99.6 % of the images, dilate ≥ shuffle on 84 % (thin classes: frame, star, crescent fall below).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from roar.attribution.base import Attribution, Context, MethodConfig
from roar.attribution.controls import oracle_mask
from roar.attribution.perturbation import image_keys
from roar.attribution.registry import register
from roar.core.schema import Seed
from roar.perturb.fills import noise_seed

TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default: the kernel ends at 4 sigma


# ---------------------------------------------------------------------------------------------- configs


class BlurConfig(MethodConfig):
    sigma: float = Field(2.0, ge=0, le=256, description="standard deviation of the Gaussian in pixels; 0: the oracle")


class DilateConfig(MethodConfig):
    radius: int = Field(2, ge=0, le=64, description="radius of the dilating disk in pixels; 0: the oracle")


class ShuffleConfig(MethodConfig):
    fraction: float = Field(
        0.5, ge=0, le=1, description="share of the object's pixels exchanged with background pixels; 0: the oracle"
    )
    seed: Seed = Field(0, description="an image's exchanged pixels depend on this seed and its dataset index")


class NoiseConfig(MethodConfig):
    noise: float = Field(
        0.5, ge=0, le=1000, description="standard deviation of the added noise, relative to the oracle's range"
    )
    seed: Seed = Field(0, description="an image's noise depends on this seed and its dataset index")


# ---------------------------------------------------------------------------------------------- pieces


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """scipy's 1-D Gaussian weights, float64: exp(−x² / 2σ²) for |x| ≤ ⌊4σ + ½⌋, summing to 1."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 / (sigma * sigma) * x**2)
    return weights / weights.sum()


def reflect_index(n: int, radius: int) -> torch.Tensor:
    """Where positions −radius … n + radius − 1 read from under scipy's ``reflect`` (d c b a | a b c d).

    The extension is periodic with period 2n, so a kernel wider than the image (small maps, large
    sigma) reflects again instead of failing, as in scipy (torch's ``reflect`` padding is scipy's
    ``mirror`` and refuses a pad as wide as the input)."""
    j = torch.arange(-radius, n + radius) % (2 * n)
    return torch.where(j < n, j, 2 * n - 1 - j)


def gaussian_filter1d(x: torch.Tensor, sigma: float, dim: int) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter1d along ``dim``, as a sum over the kernel's taps.

    Elementwise sums in a fixed order rather than a convolution: an image's result is then the
    same bits in any batch (the contract for model-free maps), whatever blocking conv kernels use."""
    weights = gaussian_kernel(sigma).tolist()
    radius, n = len(weights) // 2, x.shape[dim]
    padded = x.index_select(dim, reflect_index(n, radius).to(x.device))
    out = torch.zeros_like(x)
    for k, weight in enumerate(weights):
        out += weight * padded.narrow(dim, k, n)
    return out


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter over H then W of [B, 1, H, W] maps, in float64, returned float32.

    Below sigma = 1/8 scipy's kernel is the single weight 1 (radius ⌊4σ + ½⌋ = 0): the map itself,
    returned as is, which also spares sigma² from underflowing to a division by zero."""
    if int(TRUNCATE * sigma + 0.5) == 0:
        return maps
    out = maps.double()
    for dim in (2, 3):
        out = gaussian_filter1d(out, sigma, dim)
    return out.float()


def disk(radius: int) -> torch.Tensor:
    """The Euclidean disk {(dy, dx): dy² + dx² ≤ radius²} as a float32 [2r + 1, 2r + 1] kernel of 0 and 1."""
    r = torch.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2 <= radius**2).float()


def dilate(maps: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of [B, 1, H, W] 0/1 maps by ``disk(radius)``, outside the image counting as 0.

    The convolution counts the object pixels under the disk: small integers, exact in float32 in
    any summation order, so the result does not depend on the batch."""
    if radius == 0:
        return maps
    hits = F.conv2d(maps, disk(radius)[None, None].to(maps.device), padding=radius)
    return (hits > 0.5).float()


def moved_count(fraction: float, on: int, off: int) -> int:
    """k = min(⌊fraction · on + ½⌋, off): the object pixels to exchange, as many as the background can take."""
    return min(math.floor(fraction * on + 0.5), off)


def shuffle_off_object(oracle: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """One [H, W] 0/1 oracle with its first k object pixels and first k background pixels (in a
    seeded permutation's order) exchanged: exactly k units of relevance moved off the object."""
    flat = oracle.flatten()
    order = torch.randperm(flat.numel(), generator=generator).to(flat.device)
    inside = flat[order] > 0.5
    on, off = order[inside], order[~inside]
    k = moved_count(fraction, len(on), len(off))
    out = flat.clone()
    out[on[:k]], out[off[:k]] = flat[off[:k]], flat[on[:k]]
    return out.reshape(oracle.shape)


def add_noise(oracle: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """One [H, W] oracle plus N(0, (noise · range)²) per pixel.

    Drawn with ``Tensor.normal_`` on the image's own generator: the draw belongs to the image, not
    to the batch's random stream."""
    eps = torch.empty(oracle.shape, dtype=torch.float32).normal_(generator=generator).to(oracle.device)
    return oracle + noise * (oracle.max() - oracle.min()) * eps


def image_generators(images: torch.Tensor, context: Context, generator, seed: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded by (``seed``, its dataset index): its map is its own."""
    return [torch.Generator().manual_seed(noise_seed(seed, key)) for key in image_keys(images, context, generator)]


# ---------------------------------------------------------------------------------------------- methods


class DegradedOracle(Attribution):
    """An oracle degraded by one parameter: model-free, needs the masks, [B, 1, H, W] float32."""

    requires_model = False
    needs = frozenset({"masks"})

    def attribute(self, model, images: torch.Tensor, targets: torch.Tensor, *, generator, context) -> torch.Tensor:
        return self.degrade(oracle_mask(images, context, self.name), images, generator, context)

    def degrade(self, oracle: torch.Tensor, images: torch.Tensor, generator, context: Context) -> torch.Tensor:
        raise NotImplementedError


class SeededDegradedOracle(DegradedOracle):
    """A degradation drawn per image from its own generator (``image_generators``)."""

    def degrade(self, oracle: torch.Tensor, images: torch.Tensor, generator, context: Context) -> torch.Tensor:
        if self.is_identity():
            return oracle
        generators = image_generators(images, context, generator, self.params.seed)
        return torch.stack([self.degrade_one(o[0], g)[None] for o, g in zip(oracle, generators)])

    def is_identity(self) -> bool:
        raise NotImplementedError

    def degrade_one(self, oracle: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


@register
class OracleBlur(DegradedOracle):
    """The oracle blurred by a Gaussian of ``sigma`` pixels (scipy's gaussian_filter, reflect, truncate 4)."""

    name = "oracle_blur"
    config = BlurConfig

    def degrade(self, oracle, images, generator, context) -> torch.Tensor:
        return gaussian_blur(oracle, self.params.sigma)


@register
class OracleDilate(DegradedOracle):
    """The oracle dilated by a disk of ``radius`` pixels: the object plus a ring of background, both 1."""

    name = "oracle_dilate"
    config = DilateConfig

    def degrade(self, oracle, images, generator, context) -> torch.Tensor:
        return dilate(oracle, self.params.radius)


@register
class OracleShuffle(SeededDegradedOracle):
    """The oracle with ⌊fraction · |object| + ½⌋ object pixels exchanged with background pixels."""

    name = "oracle_shuffle"
    config = ShuffleConfig

    def is_identity(self) -> bool:
        return self.params.fraction == 0

    def degrade_one(self, oracle, generator) -> torch.Tensor:
        return shuffle_off_object(oracle, self.params.fraction, generator)


@register
class OracleNoise(SeededDegradedOracle):
    """The oracle plus Gaussian noise of std ``noise`` times its range."""

    name = "oracle_noise"
    config = NoiseConfig

    def is_identity(self) -> bool:
        return self.params.noise == 0

    def degrade_one(self, oracle, generator) -> torch.Tensor:
        return add_noise(oracle, self.params.noise, generator)
