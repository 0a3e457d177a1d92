"""Fills that paint the removed region from the rest of the image: LIME's and LIME-G's fills.

LIME (Ribeiro et al., KDD 2016, https://arxiv.org/abs/1602.04938) hides a superpixel by painting it
in its own mean colour (the ``lime`` package's default ``hide_color=None``); LIME-G (the generative
variant of Agarwal & Nguyen, ACCV 2020, https://arxiv.org/abs/1910.04256) hides it with an
inpainter, so that the model sees a plausible image rather than a flat patch. Each is a fill in
``FILLS``, usable wherever a fill is (``retrain.fill``, ``curves.fill``, the ``fill`` of ``lime``
and ``lime_g``, the inpainter of meaningful perturbations):

* ``segment_mean``: every pixel the mean colour of its segment, the segmentation coming with the
  batch (context ``segments``, int [B, H, W]); without one, an image is one segment (its mean).
* ``biharmonic``: scikit-image's biharmonic inpainting (``skimage.restoration.inpaint_biharmonic``),
  one image at a time on the CPU, all channels at once where they share a mask.
* ``plugin``: any function ``(images, removed, **kwargs) -> images`` named by a dotted path, a
  learned inpainter for instance: ``{name: plugin, function: mypkg.inpaint.lama, kwargs: {...}}``.
  It gets float images [B, C, H, W] in [0, 1] and the bool mask [B, C, H, W] (True: removed; take
  ``removed.any(1, keepdim=True)`` for one mask per pixel) and returns images of the same shape;
  a path that cannot be imported fails when the fill is built, a wrong shape when it is called.
  Its default function is ``biharmonic`` below, which is what such a plug-in looks like.

ROAD's noisy linear imputation (``road``, in ``roar.perturb.fills``) is the fourth inpainter.
All of them give an image the same values in any batch (the first three draw no random numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from roar.core.errors import RoarError
from roar.core.registry import import_object
from roar.perturb.fills import FILLS, ChannelValues, FillSection

# --------------------------------------------------------------------------------------------- segment mean


class SegmentMeanFillConfig(FillSection):
    name: Literal["segment_mean"] = "segment_mean"


class SegmentMeanFill:
    """Each pixel the per-channel mean of its segment (context ``segments``: int [B, H, W], labels ≥ 0).

    The ``lime`` package's ``hide_color=None``. Sums are taken per image in float64, so a value does
    not depend on the rest of the batch.
    """

    static = True  # the values depend on the image and its segments only (not on the mask or the index)

    def __call__(self, images: torch.Tensor, removed: torch.Tensor, **context: Any) -> torch.Tensor:
        b, c, h, w = images.shape
        segments = context.get("segments")
        if segments is None:
            labels = torch.zeros(b, h * w, dtype=torch.int64, device=images.device)
        else:
            labels = torch.as_tensor(segments, device=images.device).to(torch.int64)
            if tuple(labels.shape) != (b, h, w):
                raise ValueError(f"fill 'segment_mean': segments of shape {tuple(labels.shape)}, expected {(b, h, w)}")
            if bool((labels < 0).any()):
                raise ValueError("fill 'segment_mean': segment labels must be >= 0")
            labels = labels.reshape(b, h * w)
        k = int(labels.max()) + 1 if labels.numel() else 1
        values = images.reshape(b, c, h * w).double()
        index = labels.unsqueeze(1).expand(b, c, h * w)
        sums = torch.zeros(b, c, k, dtype=torch.float64, device=images.device).scatter_add_(2, index, values)
        counts = torch.zeros(b, k, dtype=torch.float64, device=images.device).scatter_add_(
            1, labels, torch.ones_like(labels, dtype=torch.float64)
        )
        means = sums / counts.clamp_min(1).unsqueeze(1)
        return means.gather(2, index).reshape(b, c, h, w).to(images.dtype)

    def __repr__(self) -> str:
        return "SegmentMeanFill()"


@FILLS.register("segment_mean", SegmentMeanFillConfig)
def build_segment_mean(cfg: SegmentMeanFillConfig, mean: Sequence[float] | None = None) -> SegmentMeanFill:
    return SegmentMeanFill()


# --------------------------------------------------------------------------------------------- biharmonic


class BiharmonicFillConfig(FillSection):
    name: Literal["biharmonic"] = "biharmonic"
    fallback: ChannelValues | None = Field(
        None,
        description="per-channel value in [0, 1] for a channel removed entirely (nothing to inpaint from); "
        "default: the dataset's per-channel mean, else 0.5",
    )


def biharmonic(images: torch.Tensor, removed: torch.Tensor, fallback: Sequence[float] | None = None) -> torch.Tensor:
    """``skimage.restoration.inpaint_biharmonic`` of the ``removed`` positions of each image (float64 on the CPU):
    the channels together (``channel_axis``) where they share a mask, else one by one; a plane removed
    entirely is set to ``fallback`` (per channel, default 0.5). Also the ``plugin`` fill's default function."""
    from skimage.restoration import inpaint_biharmonic

    c = images.shape[1]
    fallback = tuple(fallback or (0.5,))
    if len(fallback) not in (1, c):
        raise ValueError(f"biharmonic inpainting: {len(fallback)} fallback values for images with {c} channels")
    fallback = fallback * c if len(fallback) == 1 else fallback
    pixels = images.detach().cpu().double().numpy()
    masks = torch.broadcast_to(removed, images.shape).cpu().numpy()
    out = pixels.copy()
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        if (mask == mask[:1]).all() and not mask[0].all():  # one mask for every channel
            channels_last = inpaint_biharmonic(np.moveaxis(pixels[i], 0, -1), mask[0], channel_axis=-1)
            out[i] = np.moveaxis(channels_last, -1, 0)
            continue
        for j in range(c):
            if mask[j].all():
                out[i, j] = fallback[j]
            elif mask[j].any():
                out[i, j] = inpaint_biharmonic(pixels[i, j], mask[j])
    return torch.from_numpy(out).to(images.device, images.dtype)


class BiharmonicFill:
    """Biharmonic inpainting (``biharmonic``) with the config's or the dataset's fallback."""

    def __init__(self, fallback: Sequence[float] | None = None):
        self.fallback = tuple(float(v) for v in fallback) if fallback is not None else None

    def __call__(self, images: torch.Tensor, removed: torch.Tensor, **context: Any) -> torch.Tensor:
        return biharmonic(images, removed, self.fallback)

    def __repr__(self) -> str:
        return f"BiharmonicFill(fallback={self.fallback})"


@FILLS.register("biharmonic", BiharmonicFillConfig)
def build_biharmonic(cfg: BiharmonicFillConfig, mean: Sequence[float] | None = None) -> BiharmonicFill:
    fallback = cfg.fallback if cfg.fallback is not None else mean
    if fallback is not None and (not fallback or any(not 0.0 <= float(v) <= 1.0 for v in fallback)):
        raise RoarError(f"fill 'biharmonic': the fallback must be per-channel values in [0, 1], got {tuple(fallback)}")
    return BiharmonicFill(fallback)


# --------------------------------------------------------------------------------------------- plug-in


class PluginFillConfig(FillSection):
    name: Literal["plugin"] = "plugin"
    function: str = Field(
        "roar.perturb.inpainters.biharmonic",
        description="dotted path of a function (images, removed, **kwargs) -> images; default: biharmonic "
        "inpainting written as a plug-in (the template for one's own)",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments passed to the function")


def import_function(path: str) -> Callable:
    """The callable named by a dotted path (``package.module.function``), or a one-line ``RoarError``."""
    obj = import_object(path, "fill 'plugin'")
    if not callable(obj):
        raise RoarError(f"fill 'plugin': '{path}' is a {type(obj).__name__}, not a function")
    return obj


class PluginFill:
    """``function(images, removed, **kwargs)``: its output checked (shape [B, C, H, W]) and brought to the images'
    device and dtype."""

    def __init__(self, path: str, kwargs: dict[str, Any] | None = None):
        self.path = path
        self.kwargs = dict(kwargs or {})
        self.function = import_function(path)

    def __call__(self, images: torch.Tensor, removed: torch.Tensor, **context: Any) -> torch.Tensor:
        with torch.no_grad():
            out = self.function(images, torch.broadcast_to(removed, images.shape), **self.kwargs)
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(np.ascontiguousarray(out))
        if not isinstance(out, torch.Tensor):
            raise RoarError(f"fill 'plugin': {self.path} returned {type(out).__name__}; expected a tensor or array")
        if tuple(out.shape) != tuple(images.shape):
            raise RoarError(
                f"fill 'plugin': {self.path} returned shape {list(out.shape)}; expected the images' "
                f"{list(images.shape)} ([B, C, H, W])"
            )
        return out.detach().to(images.device, images.dtype)

    def __repr__(self) -> str:
        return f"PluginFill({self.path}, {self.kwargs})"


@FILLS.register("plugin", PluginFillConfig)
def build_plugin(cfg: PluginFillConfig, mean: Sequence[float] | None = None) -> PluginFill:
    return PluginFill(cfg.function, cfg.kwargs)
