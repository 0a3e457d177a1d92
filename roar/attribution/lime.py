"""LIME (Ribeiro, Singh & Guestrin, KDD 2016, https://arxiv.org/abs/1602.04938) and LIME-G, its
variant with an inpainter (Agarwal & Nguyen, "Explaining image classifiers by removing input
features using generative models", ACCV 2020, https://arxiv.org/abs/1910.04256).

An image is cut into SLIC superpixels (scikit-image; the seed's n_segments 50, compactness 30,
sigma 3). ``samples`` binary vectors switch superpixels on or off (each off with probability ½; the
first vector is all on, the image itself); the off ones are replaced by the ``fill``; the model's
softmax probability of the target class on each perturbed image is the response. A ridge regression
(scikit-learn ``Ridge``, alpha 1, with intercept), weighted by LIME's exponential kernel
``sqrt(exp(-d² / width²))`` of the cosine distance d between a vector and the all-on one (width
0.25), gives one weight per superpixel, painted back as the map [B, 1, H, W]. These are the ``lime``
package's ``LimeImageExplainer`` defaults (its 'auto' feature selection keeps every superpixel when
``num_features`` is left at 100000), so the weights agree with it in rank (tests/test_lime.py).

The fill is any registered fill (``{fill: {name: biharmonic}}``): ``lime`` defaults to
``segment_mean``, each hidden superpixel painted in its own mean colour, which is the ``lime``
package's ``hide_color=None`` default and the seed's "mean colour"; ``lime_g`` defaults to ROAD's
noisy linear imputation (``road``), with ``biharmonic`` and a learned inpainter (``plugin``, a dotted
path) as options (``roar.perturb.inpainters``). Fills that need the dataset mean (``mean``, the
``road`` fallback) take the model's normalisation mean (``Classifier.mean``), which is the dataset's.

Speed. The perturbed inputs of all images and samples go through the model together, in chunks of
``max_batch`` (by default 4× the gradient engine's chunk: 256 on the CPU, 4096 on a GPU, fewer for
large images; the ``lime`` package calls the model on 10 images at a time, each built by a Python
loop over its hidden superpixels): a chunk's masks are one gather from the sample vectors by the
superpixel labels, its fill one call (or none: a fill whose values depend on the image alone, such as
``segment_mean``, says ``static = True`` and is computed once per image). Both pay one forward pass per
sample, so on a CPU the model bounds the gain: ``docs/benchmarks.md`` (section "LIME") measures it.

Randomness. An image's sample vectors come from a numpy generator seeded by (``seed``, its dataset
index: ``context.indices``, the batch positions without them), and the fill sees sample k of every
image as index k (a noisy fill such as ``road`` seeds its noise for it by k alone, and its draws then
depend only on the image and its mask): so an image gets the same map in any batch, at any position,
in any run. The batch's ``generator`` is
not used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from roar.attribution.base import Attribution, EngineConfig
from roar.attribution.engine import _is_channels_last, frozen, max_batch_for
from roar.attribution.registry import register
from roar.core.schema import Seed
from roar.perturb.fills import FILLS, FillConfig, ablate, build_fill

# ---------------------------------------------------------------------------------------------- config


class LimeConfig(EngineConfig):
    samples: int = Field(
        500, ge=2, le=100_000, description="perturbed images per image (the first: all superpixels on)"
    )
    n_segments: int = Field(50, ge=1, description="SLIC: approximate number of superpixels")
    compactness: float = Field(30.0, gt=0, description="SLIC: colour against space (higher: squarer superpixels)")
    sigma: float = Field(3.0, ge=0, description="SLIC: Gaussian smoothing of the image before segmenting, in pixels")
    kernel_width: float = Field(0.25, gt=0, description="width of LIME's exponential kernel on the cosine distance")
    alpha: float = Field(1.0, ge=0, description="ridge penalty of the surrogate (the lime package's Ridge(alpha=1))")
    fill: FillConfig = Field(
        "segment_mean", description="what hides a superpixel: any registered fill (default: its mean colour)"
    )
    seed: Seed = Field(0, description="an image's sample vectors depend on this seed and its dataset index")

    @model_validator(mode="after")
    def _fill_is_per_pixel(self) -> LimeConfig:
        if FILLS.config_class(self.fill.name).patches:
            raise PydanticCustomError(
                "patch_fill",
                "fill '{name}' replaces whole patches; LIME hides superpixels",
                {"key": "fill", "name": self.fill.name},
            )
        return self


class LimeGConfig(LimeConfig):
    fill: FillConfig = Field(
        "road", description="the inpainter that hides a superpixel: road (default), biharmonic, plugin, any fill"
    )


# ---------------------------------------------------------------------------------------------- parts

FORWARD_CHUNK = 4
"""Perturbed images per forward pass, by default: this many times the gradient engine's per-device chunk
(a forward pass keeps no activations for a backward one). On 2 CPU cores, ResNet8 16/32/64 runs
5230 inputs/s at 256 against 4736 at 64 (4/8/8: 17697 against 14184)."""

CHUNK_VALUES = 1 << 26
"""At most this many input values per forward pass by default (256 MB of float32 inputs): 21845 images
of 32×32×3, 445 of 224×224×3."""


def forward_chunk(device: torch.device, max_batch: int | None, shape: Sequence[int]) -> int:
    """Inputs per forward pass: ``max_batch`` if set, else ``FORWARD_CHUNK`` × the engine's default for the
    device (256 on the CPU, 4096 on a GPU) within ``CHUNK_VALUES``."""
    if max_batch:
        return max_batch
    return max(1, min(FORWARD_CHUNK * max_batch_for(device), CHUNK_VALUES // math.prod(shape[1:])))


def superpixels(images: torch.Tensor, n_segments: int = 50, compactness: float = 30.0, sigma: float = 3.0) -> list:
    """SLIC labels of each image ([B, C, H, W] in [0, 1]): int64 [H, W] arrays numbered 0..k-1.

    Colour images are segmented in Lab (scikit-image's default for three channels). Labels start
    at 0 and have no gaps (the ``lime`` package numbers its features 0..k-1, so scikit-image's
    default labels from 1 would leave the last superpixel always on there).
    """
    from skimage.segmentation import slic

    pixels = images.detach().cpu().double().numpy()
    out = []
    for image in pixels:
        if image.shape[0] == 1:
            labels = slic(image[0], n_segments, compactness, sigma=sigma, start_label=0, channel_axis=None)
        else:
            labels = slic(np.moveaxis(image, 0, -1), n_segments, compactness, sigma=sigma, start_label=0)
        out.append(np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(np.int64))
    return out


def sample_vectors(seed: int, index: int, samples: int, features: int) -> np.ndarray:
    """bool [samples, features]: each superpixel on with probability ½, the first row all on."""
    rng = np.random.default_rng([int(seed), int(index)])
    vectors = rng.integers(0, 2, size=(samples, features)).astype(bool)
    vectors[0] = True
    return vectors


def kernel_weights(vectors: np.ndarray, width: float) -> np.ndarray:
    """LIME's weights: ``sqrt(exp(-d² / width²))``, d the cosine distance to the all-on vector (1 − sqrt(on / k))."""
    distance = 1.0 - np.sqrt(vectors.sum(1) / vectors.shape[1])
    return np.sqrt(np.exp(-(distance**2) / width**2))


def surrogate(vectors: np.ndarray, responses: np.ndarray, width: float, alpha: float) -> np.ndarray:
    """The weight of each superpixel: scikit-learn's weighted ridge regression of the responses on the vectors."""
    from sklearn.linear_model import Ridge

    fit = Ridge(alpha=alpha, fit_intercept=True).fit(
        vectors.astype(np.float64), responses, sample_weight=kernel_weights(vectors, width)
    )
    return fit.coef_


# ---------------------------------------------------------------------------------------------- methods


@register
class Lime(Attribution):
    """LIME over SLIC superpixels: a kernel-weighted ridge surrogate of the target's probability, [B, 1, H, W]."""

    name = "lime"
    config = LimeConfig

    def __init__(self, **params: Any):
        super().__init__(**params)
        build_fill(self.params.fill, mean=(0.5,))  # a bad fill (plug-in path) fails here, before any work
        self._fills: dict[tuple, Any] = {}

    @property
    def passes(self) -> int:
        return self.params.samples  # forward passes only

    def fill_for(self, model) -> Any:
        """The fill, built with the model's normalisation mean (the dataset's) when it has one."""
        mean = getattr(model, "mean", None)
        key = tuple(float(m) for m in mean.reshape(-1)) if isinstance(mean, torch.Tensor) else None
        if key not in self._fills:
            self._fills[key] = build_fill(self.params.fill, mean=key)
        return self._fills[key]

    def attribute(self, model, images, targets, *, generator, context):
        p = self.params
        b, _, h, w = images.shape
        segments = superpixels(images, p.n_segments, p.compactness, p.sigma)
        indices = context.indices if context is not None and context.indices is not None else torch.arange(b)
        indices = torch.as_tensor(indices).reshape(-1).tolist()
        vectors = [sample_vectors(p.seed, i, p.samples, int(s.max()) + 1) for i, s in zip(indices, segments)]
        responses = self.responses(model, images, targets, segments, vectors).cpu().numpy()
        maps = [surrogate(v, r, p.kernel_width, p.alpha)[s] for v, r, s in zip(vectors, responses, segments)]
        return torch.from_numpy(np.stack(maps)).float().view(b, 1, h, w).to(images.device)

    def responses(self, model, images, targets, segments: list, vectors: list) -> torch.Tensor:
        """float64 [B, samples]: p(target) on every perturbed image, all images' samples in chunks of ``max_batch``."""
        device = images.device
        b, c, h, w = images.shape
        samples = self.params.samples
        labels = torch.from_numpy(np.stack(segments)).to(device).view(b, h * w)
        on = torch.zeros(b, samples, max(v.shape[1] for v in vectors), dtype=torch.bool)
        for i, v in enumerate(vectors):
            on[i, :, : v.shape[1]] = torch.from_numpy(v)
        on = on.to(device)
        fill = self.fill_for(model)
        chunk = forward_chunk(device, self.params.max_batch, images.shape)
        fmt = torch.channels_last if _is_channels_last(model) else torch.contiguous_format
        images = images.contiguous(memory_format=fmt)  # so that the perturbed copies mostly are too
        targets = targets.to(device)
        out = torch.empty(b * samples, dtype=torch.float64, device=device)
        with frozen(model), torch.no_grad():
            hidden = None
            if getattr(fill, "static", False):  # its values depend on the image alone: fill each image once
                everything = torch.ones(b, c, h, w, dtype=torch.bool, device=device)
                hidden = fill(images, everything, segments=labels.view(b, h, w)).to(images.dtype)
            for start in range(0, b * samples, chunk):
                rows = torch.arange(start, min(start + chunk, b * samples), device=device)
                image, sample = rows // samples, rows % samples  # image-major: an image's samples in order
                removed = ~on[image, sample].gather(1, labels[image])  # [m, H·W]: the hidden superpixels' pixels
                removed = removed.view(-1, 1, h, w)
                if hidden is not None:
                    perturbed = torch.where(removed, hidden[image], images[image])
                else:
                    perturbed = ablate(
                        images[image],
                        removed.expand(-1, c, h, w),
                        fill,
                        indices=sample,
                        segments=labels[image].view(-1, h, w),
                    )
                probs = model(perturbed.contiguous(memory_format=fmt)).float().softmax(1)
                out[start : start + len(rows)] = probs.gather(1, targets[image].view(-1, 1)).squeeze(1).double()
        return out.view(b, samples)


@register
class LimeG(Lime):
    """LIME with an inpainter hiding the superpixels (ROAD's imputation by default): [B, 1, H, W]."""

    name = "lime_g"
    config = LimeGConfig
