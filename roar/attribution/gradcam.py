"""Grad-CAM (Selvaraju et al., ICCV 2017): class activation maps weighted by pooled gradients.

At a chosen layer with activations A_k (k = channels), map = ReLU(Σ_k w_k A_k) with
w_k = spatial mean of ∂y_c/∂A_k, y_c the pre-softmax logit of the target class; the h×w map is
upsampled bilinearly (``align_corners=False``) to the input's H×W, as Captum's ``LayerGradCam`` +
``LayerAttribution.interpolate(..., "bilinear")`` do. Bilinear rather than nearest-neighbour
upsampling matters for ROAR: nearest upsampling makes blocks of thousands of tied pixels whose
ranking would be decided by the tie-breaker, not the method.

The layer's output is replaced (by a forward hook) with a detached copy that requires grad, so
the backward pass stops at the layer: nothing below it is recorded, parameters are frozen, and
only ∂y_c/∂A is computed. Layer names are those of ``model.named_modules()``; a name relative to
a wrapper (``layer3`` for ``Classifier``'s ``net.layer3``) is accepted when it is unambiguous.
``auto`` picks the last module (in execution order) whose output is [B, C, h, w] with h·w > 1,
i.e. the last convolutional stage, not the global pooling.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from roar.attribution.base import Attribution, EngineConfig
from roar.attribution.engine import DEFAULT_MAX_BATCH, frozen, max_batch_for, select
from roar.attribution.registry import register
from roar.core.errors import RoarError
from roar.core.registry import closest


def last_spatial_layer(model: nn.Module, images: torch.Tensor) -> str:
    """Name of the last module to finish whose output is [B, C, h, w] with h·w > 1 (one image run)."""
    names = {module: name for name, module in model.named_modules()}
    found: list[str] = []

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[2] * output.shape[3] > 1:
            found.append(names[module])

    handles = [module.register_forward_hook(hook) for module in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(images[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    found = [name for name in found if name]  # the model itself is no layer of itself
    if not found:
        raise RoarError("no layer of the model has a spatial [B, C, h, w] output; name one with 'layer'")
    return found[-1]


def resolve_layer(model: nn.Module, layer: str, images: torch.Tensor | None = None) -> tuple[str, nn.Module]:
    """``(full name, module)`` for a layer name: exact, relative to a wrapper, or ``auto``."""
    modules = dict(model.named_modules())
    if layer == "auto":
        if images is None:
            raise RoarError("layer 'auto' needs example images to find the last spatial layer")
        layer = last_spatial_layer(model, images)
    if layer in modules and layer:
        return layer, modules[layer]
    matches = [name for name in modules if name.endswith("." + layer)]
    if len(matches) == 1:
        return matches[0], modules[matches[0]]
    if matches:
        raise RoarError(f"layer '{layer}' is ambiguous: {', '.join(matches)}; give the full name")
    names = [name for name in modules if name]
    relative = [name.split(".", 1)[1] for name in names if "." in name]
    near = difflib.get_close_matches(layer, list(dict.fromkeys(names + relative)), n=5, cutoff=0.5)
    listing = (
        f"close names: {', '.join(near)}"
        if near
        else f"outer layers: {', '.join(n for n in names if n.count('.') <= 1)}"
    )
    raise RoarError(f"unknown layer '{layer}'{closest(layer, names + relative)}; {listing}")


class _Capture:
    """Forward hook: replaces the layer's output by a leaf that requires grad and keeps it."""

    def __init__(self):
        self.activation: torch.Tensor | None = None

    def __call__(self, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise RoarError(f"gradcam: layer output must be one tensor, got {type(output).__name__}")
        leaf = output.detach().requires_grad_(True)
        self.activation = leaf  # the last call wins for a module used twice
        return leaf.clone()  # a non-leaf, so that later in-place layers may modify it


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: nn.Module,
    *,
    relu: bool = True,
    max_batch: int | None = DEFAULT_MAX_BATCH,
) -> torch.Tensor:
    """Grad-CAM at ``layer`` (a module of ``model``), upsampled to the input: [B, 1, H, W]."""
    max_batch = max_batch_for(images.device, max_batch)
    capture = _Capture()
    out = torch.empty((len(images), 1, *images.shape[2:]), dtype=torch.float32, device=images.device)
    targets = targets.to(images.device)
    handle = layer.register_forward_hook(capture)
    try:
        with frozen(model):
            for start in range(0, len(images), max_batch):
                stop = min(start + max_batch, len(images))
                capture.activation = None
                with torch.enable_grad():
                    logits = model(images[start:stop]).float()
                    acts = capture.activation
                    if acts is None:
                        raise RoarError("gradcam: the chosen layer was not called in the forward pass")
                    if acts.ndim != 4:
                        raise RoarError(f"gradcam needs a layer with [B, C, h, w] output, got {tuple(acts.shape)}")
                    (grads,) = torch.autograd.grad(select(logits, targets[start:stop]).sum(), acts)
                weights = grads.float().mean(dim=(2, 3), keepdim=True)
                cam = (weights * acts.detach().float()).sum(dim=1, keepdim=True)
                if relu:
                    cam = cam.clamp(min=0)
                if cam.shape[2:] != images.shape[2:]:
                    cam = F.interpolate(cam, size=images.shape[2:], mode="bilinear", align_corners=False)
                out[start:stop] = cam
    finally:
        handle.remove()
    return out


class GradCAMConfig(EngineConfig):
    layer: str = Field(
        "auto",
        description="module name (model.named_modules(), or relative to the wrapped net); auto = last conv stage",
    )
    relu: bool = Field(True, description="ReLU on the weighted sum (Grad-CAM); False keeps negative evidence")


@register
class GradCAM(Attribution):
    """Grad-CAM at ``layer``, bilinearly upsampled: [B, 1, H, W]."""

    name = "gradcam"
    config = GradCAMConfig

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, generator, context
    ) -> torch.Tensor:
        _, module = resolve_layer(model, self.params.layer, images)
        return gradcam(model, images, targets, module, relu=self.params.relu, max_batch=self.params.max_batch)
