"""Meaningful perturbations (Fong & Vedaldi, "Interpretable Explanations of Black Boxes by Meaningful
Perturbation", ICCV 2017) and MP-G, their generative variant (Agarwal & Nguyen, "Explaining Image
Classifiers by Removing Input Features Using Generative Models", ACCV 2020).

Both learn, per image, a low-resolution mask m ∈ [0, 1]^{h×w} (28×28; min(mask_size, H) × min(mask_size, W)
for smaller images), upsampled bilinearly to the image, that deletes as little as possible while
destroying the target class:

    minimise  λ₁ Σ|1 − m| + λ₂ Σ|∇m|^β + p_c(perturbed)      (p_c: softmax probability of the target)

with Adam (lr 0.1) for ``iterations`` steps, m clamped to [0, 1] after each. The sums run over the
mask's cells and neighbour differences, as in the seed (MP_test.sh: λ₁ = 1e-4, λ₂ = 1e-2, β = 3, 300
iterations, blur radius 10, jitter 4). The map is the deletion region 1 − m, upsampled: [B, 1, H, W].

* ``meaningful_perturbation``: perturbed = x·m + P(x)·(1 − m), P a fill (``perturbation``, by default
  ``{name: blur, sigma: 10}``: the paper's blur; ``mean`` gives its constant perturbation), applied once
  per image with every pixel removed.
* ``mp_g``: the deleted region is inpainted (``inpainter``: any registered fill, by default ``road``,
  ROAD's linear imputation; a learned inpainter plugs in as a fill). The mask is binarised in the
  forward pass, kept where m > ``threshold``, and the inpainter fills removed = binarised 1 − m at
  every step. The backward pass is the straight-through estimator: the gradient of x·m + B·(1 − m)
  with B the inpainted values where the mask deletes and, where it keeps, the inpainter's fill of the
  whole image (an inpainter returns a kept pixel unchanged, which would give it no gradient: a pixel
  kept once could never be deleted again; the seed's gradient reached only the pixels that its random
  start had deleted). ROAD's noise is off by default (``{name: road, noise: 0.01}`` turns it on): it guards ROAD's
  evaluation against leakage and adds nothing to a mask's optimisation.

Choices, and why:

* Initialisation: every cell at ``init`` = 0.5. The seed draws the mask uniformly at random
  (``np.random.rand(28, 28)``); 0.5 is that draw's mean, without the noise. Starting half-perturbed keeps
  p_c away from saturation, where its gradient would vanish under λ₁; for ``mp_g`` (0.5 is not > 0.5)
  the first step sees the whole image inpainted.
* Binarisation: the fixed threshold m > 0.5. The seed's max(0.5, 0.5·(max m + min m)) assumes a random
  start; on a constant mask it deletes everything whatever the gradient says.
* Jitter: at every step the input (and its background) is shifted by (dy, dx), each uniform over J
  offsets centred on zero, {−⌊J/2⌋, …, J − 1 − ⌊J/2⌋} (the seed crops a window at randint(J) from an
  image enlarged by J), the border replicated; the mask stays fixed.

Batching. All masks of a chunk of ``max_batch`` images are one [b, 1, h, w] tensor under one Adam; the
loss is the sum of the images' losses, and Adam works element by element, so every image follows
exactly its own optimisation (its map agrees with the image optimised alone to float rounding of the
model's batched convolutions). The random shifts come from one generator per image, seeded by
(``seed``, the image's dataset index) when the context gives indices (as extraction does), else by a
key per image drawn from the batch's generator: an image's map never depends on the other images of
its batch. The fills get the same indices, so a noisy fill's noise is that image's own.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from roar.attribution.base import Attribution, Context, EngineConfig
from roar.attribution.engine import frozen, max_batch_for
from roar.attribution.registry import register
from roar.core.schema import Section, Seed
from roar.perturb.fills import FillConfig, ablate, build_fill, noise_seed

# ---------------------------------------------------------------------------------------------- config


class PerturbationConfig(EngineConfig):
    """The optimisation both methods share (the seed's MP_test.sh settings)."""

    iterations: int = Field(300, ge=1, le=100_000, description="Adam steps per mask")
    lr: float = Field(0.1, gt=0, description="Adam learning rate")
    l1_coeff: float = Field(1e-4, ge=0, description="λ₁: weight of Σ|1 − m| over the mask's cells (deletion area)")
    tv_coeff: float = Field(1e-2, ge=0, description="λ₂: weight of Σ|∇m|^β over the mask's neighbour pairs")
    tv_beta: float = Field(3.0, ge=1, description="β: exponent of the total-variation term")
    mask_size: int = Field(28, ge=1, le=4096, description="mask side (min(mask_size, H) × min(mask_size, W))")
    jitter: int = Field(4, ge=0, le=64, description="J: the input is shifted by one of J offsets per axis per step")
    init: float = Field(0.5, ge=0, le=1, description="initial value of every mask cell")
    seed: Seed = Field(0, description="jitter seed; an image's shifts depend on it and its dataset index")


def _per_pixel(fill: Section, what: str) -> Section:
    if type(fill).patches:
        raise PydanticCustomError(
            "patch_fill",
            "fill '{name}' replaces whole patches; {what} needs a fill of single pixels",
            {"name": fill.name, "what": what},
        )
    return fill


class MeaningfulPerturbationConfig(PerturbationConfig):
    perturbation: FillConfig = Field(
        default_factory=lambda: {"name": "blur", "sigma": 10.0},
        description="what the deleted part becomes (every pixel removed): a fill and its parameters",
    )

    @field_validator("perturbation")
    @classmethod
    def _per_pixel(cls, fill):
        return _per_pixel(fill, "a perturbation")


class GenerativePerturbationConfig(PerturbationConfig):
    inpainter: FillConfig = Field(
        default_factory=lambda: {"name": "road", "noise": 0.0},
        description="the fill of the deleted region (removed = binarised 1 − m) at every step",
    )
    threshold: float = Field(0.5, gt=0, lt=1, description="binarisation: a pixel is kept where m > threshold")

    @field_validator("inpainter")
    @classmethod
    def _per_pixel(cls, fill):
        return _per_pixel(fill, "an inpainter")


# ---------------------------------------------------------------------------------------------- pieces


def tv_norm(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ|m[i+1, j] − m[i, j]|^β + Σ|m[i, j+1] − m[i, j]|^β per image of [B, 1, h, w]: [B]."""
    rows = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).abs().pow(beta).flatten(1).sum(1)
    cols = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).abs().pow(beta).flatten(1).sum(1)
    return rows + cols


def image_keys(images: torch.Tensor, context: Context, generator: torch.Generator) -> list[int]:
    """One key per image: its dataset index, else a draw of the batch's generator."""
    if context.indices is not None:
        keys = torch.as_tensor(context.indices).reshape(-1).tolist()
        if len(keys) != len(images):
            raise ValueError(f"{len(keys)} indices for {len(images)} images")
        return [int(k) for k in keys]
    return torch.randint(0, 2**62, (len(images),), generator=generator, device=generator.device).tolist()


class Jitter:
    """The shifted copies of a batch at each step: windows of a replicate-padded image, one
    offset per image and step from that image's own generator."""

    def __init__(self, jitter: int, steps: int, keys: list[int], seed: int, size: tuple[int, int], device):
        self.jitter = jitter if jitter > 1 else 0
        self.lo = self.jitter // 2
        self.hi = self.jitter - 1 - self.lo if self.jitter else 0
        h, w = size
        if not self.jitter:
            return
        offsets = torch.stack(  # [B, steps, 2] in {0, …, J − 1}
            [
                torch.empty((steps, 2), dtype=torch.int64).random_(
                    0, self.jitter, generator=torch.Generator().manual_seed(noise_seed(seed, k))
                )
                for k in keys
            ]
        ).to(device)
        width = w + self.jitter - 1
        rows = offsets[:, :, 0, None] + torch.arange(h, device=device)  # [B, steps, h]
        cols = offsets[:, :, 1, None] + torch.arange(w, device=device)  # [B, steps, w]
        self.index = (rows[..., :, None] * width + cols[..., None, :]).flatten(2)  # [B, steps, h·w]

    def pad(self, images: torch.Tensor) -> torch.Tensor:
        if not self.jitter:
            return images
        return F.pad(images, (self.lo, self.hi, self.lo, self.hi), mode="replicate")

    def window(self, padded: torch.Tensor, step: int, size: tuple[int, int]) -> torch.Tensor:
        """The step's [B, C, H, W] window of each padded image."""
        if not self.jitter:
            return padded
        b, c = padded.shape[:2]
        index = self.index[:, step, None, :].expand(b, c, -1)
        return padded.flatten(2).gather(2, index).view(b, c, *size)


# ---------------------------------------------------------------------------------------------- methods


class MaskOptimisation(Attribution):
    """The deletion game both methods play; subclasses say how a mask perturbs the (shifted) image."""

    config: ClassVar[type[PerturbationConfig]] = PerturbationConfig

    @property
    def passes(self) -> int:
        return self.params.iterations

    def fill_spec(self) -> Section:
        raise NotImplementedError

    def prepare(self, images: torch.Tensor, fill, keys: list[int]) -> torch.Tensor:
        """What the per-step windows are cut from: each image beside its fill with every pixel removed."""
        everything = torch.ones_like(images, dtype=torch.bool)
        return torch.cat([images, ablate(images, everything, fill, indices=keys)], dim=1)

    def perturb(self, x: torch.Tensor, background: torch.Tensor, up: torch.Tensor, fill, keys) -> torch.Tensor:
        """The perturbed input of one step: the shifted image, its shifted ``background`` (``prepare``'s
        fill) and the upsampled mask."""
        raise NotImplementedError

    def attribute(self, model, images, targets, *, generator, context):
        mean = getattr(model, "mean", None)
        fill = build_fill(self.fill_spec(), mean=None if mean is None else mean.reshape(-1).tolist())
        keys = image_keys(images, context, generator)
        maps = torch.empty((len(images), 1, *images.shape[2:]), dtype=torch.float32, device=images.device)
        chunk = max_batch_for(images.device, self.params.max_batch)
        with frozen(model):
            for start in range(0, len(images), chunk):
                rows = slice(start, start + chunk)
                maps[rows] = self.optimise(model, images[rows], targets[rows], keys[rows], fill)
        return maps

    def optimise(self, model, images: torch.Tensor, targets: torch.Tensor, keys: list[int], fill) -> torch.Tensor:
        """1 − m, upsampled, for a chunk of images: all masks under one Adam, the images' losses summed."""
        p = self.params
        b, _, height, width = images.shape
        size = (height, width)
        images = images.detach().float()
        mask = torch.full(
            (b, 1, min(p.mask_size, height), min(p.mask_size, width)), p.init, device=images.device
        ).requires_grad_(True)
        optimiser = torch.optim.Adam([mask], lr=p.lr)
        jitter = Jitter(p.jitter, p.iterations, keys, p.seed, size, images.device)
        padded = jitter.pad(self.prepare(images, fill, keys))
        targets = targets.to(images.device).view(-1, 1)
        for step in range(p.iterations):
            with torch.enable_grad():
                up = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
                x, background = jitter.window(padded, step, size).chunk(2, dim=1)
                perturbed = self.perturb(x, background, up, fill, keys)
                probability = model(perturbed).float().softmax(1).gather(1, targets).squeeze(1)
                area = (1 - mask).abs().flatten(1).sum(1)
                loss = p.l1_coeff * area + p.tv_coeff * tv_norm(mask, p.tv_beta) + probability
                optimiser.zero_grad(set_to_none=True)
                loss.sum().backward()
            optimiser.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
        with torch.no_grad():
            return 1 - F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


@register
class MeaningfulPerturbation(MaskOptimisation):
    """The smallest region whose perturbation (default: blur, σ = 10) destroys the target class."""

    name = "meaningful_perturbation"
    config = MeaningfulPerturbationConfig

    def fill_spec(self) -> Section:
        return self.params.perturbation

    def perturb(self, x, background, up, fill, keys):
        return background + (x - background) * up


@register
class GenerativePerturbation(MaskOptimisation):
    """MP-G: the deleted region inpainted (default: ROAD's linear imputation), the mask binarised forward."""

    name = "mp_g"
    config = GenerativePerturbationConfig

    def fill_spec(self) -> Section:
        return self.params.inpainter

    def perturb(self, x, background, up, fill, keys):
        removed = (up <= self.params.threshold).expand_as(x)
        inpainted = ablate(x, removed, fill, indices=keys)
        # Straight-through: the forward pass is the inpainted image (kept pixels bit-identical); the
        # backward pass is that of x·m + B·(1 − m), B the inpainted values where deleted and the
        # background elsewhere (an inpainter returns a kept pixel unchanged: no gradient to delete it).
        reference = torch.where(removed, inpainted, background)
        return inpainted + (x - reference) * (up - up.detach())
