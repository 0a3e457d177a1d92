"""Model-independent controls: what an attribution method has to beat.

ROAR (Hooker et al., NeurIPS 2019) compares every method against a random ranking and a Sobel
edge detector: a method that degrades a retrained model no more than random removal carries no
information about the model, and one that does no better than an edge detector may only be
finding edges. ``ground_truth`` is the oracle at the other end: on datasets with object masks
(``shapes``), the labelled object itself.

All three ignore the model (``requires_model = False``) and return [B, 1, H, W] float32 maps;
``ground_truth`` declares that it needs the dataset's masks (``needs``). Explanations of graded
quality between the oracle and random (the oracle blurred, dilated, shuffled) are in
``roar.attribution.oracle``; they start from the same ``oracle_mask``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from roar.attribution.base import Attribution, MethodConfig
from roar.attribution.registry import register
from roar.core.errors import RoarError


class ControlConfig(MethodConfig):
    """The controls take no parameters."""


@register
class RandomMap(Attribution):
    """A map uniform in [0, 1), drawn from the batch's ``generator``: reproducible per batch."""

    name = "random"
    config = ControlConfig
    requires_model = False

    def attribute(self, model, images: torch.Tensor, targets: torch.Tensor, *, generator, context) -> torch.Tensor:
        shape = (len(images), 1, *images.shape[2:])
        return torch.rand(shape, generator=generator, device=generator.device).to(images.device)


# Cross-correlation kernels of scipy.ndimage.sobel: derivative [-1, 0, 1] along one axis,
# smoothing [1, 2, 1] along the other, unnormalised.
_SOBEL = torch.tensor(
    [
        [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],  # along W (scipy axis=-1)
        [[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]],  # along H (scipy axis=-2)
    ]
).unsqueeze(1)


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """sqrt(Σ_c sobel_H(x_c)² + sobel_W(x_c)²): [B, C, H, W] -> [B, 1, H, W].

    Matches ``scipy.ndimage.sobel`` exactly: unnormalised kernels (no 1/8 or 1/4 factor, unlike
    ``skimage.filters.sobel``, which also divides the squared sum by the number of axes) and
    scipy's default border mode ``reflect`` (``d c b a | a b c d``), which for a 3×3 kernel is
    the same as replicating the edge pixel.
    """
    b, c, h, w = images.shape
    x = F.pad(images.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(x, _SOBEL.to(x.device))  # [B*C, 2, H, W]
    return grads.square().reshape(b, c * 2, h, w).sum(dim=1, keepdim=True).sqrt()


@register
class Sobel(Attribution):
    """Sobel edge magnitude of the image, channels summed in quadrature: [B, 1, H, W]."""

    name = "sobel"
    config = ControlConfig
    requires_model = False

    def attribute(self, model, images: torch.Tensor, targets: torch.Tensor, *, generator, context) -> torch.Tensor:
        return sobel_magnitude(images)


def oracle_mask(images: torch.Tensor, context, name: str) -> torch.Tensor:
    """The labelled object (``context.masks == 1``) as a [B, 1, H, W] float32 map, 1 on it and 0 elsewhere.

    Shared by ``ground_truth`` and its degradations (``roar.attribution.oracle``), so that every
    one of them starts from the same map and refuses a batch without masks in the same words."""
    masks = context.masks if context is not None else None
    if masks is None:
        raise RoarError(f"{name} needs a dataset with object masks (e.g. shapes)")
    masks = torch.as_tensor(masks)
    expected = (len(images), *images.shape[2:])
    if tuple(masks.shape) != expected:
        raise RoarError(f"{name}: masks have shape {tuple(masks.shape)}, expected [B, H, W] = {list(expected)}")
    return (masks == 1).to(device=images.device, dtype=torch.float32).unsqueeze(1)


@register
class GroundTruth(Attribution):
    """The labelled object's mask (``context.masks == 1``) as a map: 1 on it, 0 elsewhere."""

    name = "ground_truth"
    config = ControlConfig
    requires_model = False
    needs = frozenset({"masks"})

    def attribute(self, model, images: torch.Tensor, targets: torch.Tensor, *, generator, context) -> torch.Tensor:
        return oracle_mask(images, context, self.name)
