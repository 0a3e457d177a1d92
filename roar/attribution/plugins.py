"""Attribution methods from outside roar: any function named by a dotted path.

A researcher's own method, or one from Captum, is evaluated by ROAR/KAR like a built-in one
without editing roar: a config entry ``method: mypackage.saliency.fn`` (any name with a dot)
becomes a ``PluginAttribution`` that calls ``fn(model, images, targets, **kwargs)``. The model is
in eval mode with frozen parameters during the call, images are in [0, 1] (the model normalises
them), and whatever comes back (tensor or numpy array; [B, C, H, W], [B, 1, H, W] or [B, H, W])
is checked and brought to roar's [B, C|1, H, W] float32, so a wrong shape fails here, with the
plug-in's name, and not later in ranking or ablation.

``captum`` is such a function, adapting ``captum.attr`` classes
(``method: roar.attribution.plugins.captum``, ``kwargs: {attribution: Saliency, abs: false}``).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from roar.attribution.base import Attribution, MethodConfig
from roar.attribution.engine import frozen
from roar.attribution.gradcam import resolve_layer
from roar.core.errors import RoarError
from roar.core.registry import closest, import_object


def as_attribution_map(out: Any, images: torch.Tensor, name: str) -> torch.Tensor:
    """A plug-in's output as float32 [B, C, H, W] or [B, 1, H, W] on the images' device."""
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(np.ascontiguousarray(out))
    if not isinstance(out, torch.Tensor):
        raise RoarError(f"plug-in '{name}' returned {type(out).__name__}; expected a tensor or numpy array")
    b, c, h, w = images.shape
    shape = tuple(out.shape)
    if out.ndim == 3 and shape == (b, h, w):
        out = out.unsqueeze(1)
    elif not (out.ndim == 4 and shape[0] == b and shape[1] in (c, 1) and shape[2:] == (h, w)):
        raise RoarError(
            f"plug-in '{name}' returned shape {list(shape)}; expected [B, C, H, W], [B, 1, H, W] or [B, H, W] "
            f"with B={b}, C={c}, H={h}, W={w}"
        )
    return out.detach().to(device=images.device, dtype=torch.float32)


class PluginConfig(MethodConfig):
    method: str = Field(description="dotted path of a function (model, images, targets, **kwargs) -> map")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments passed to the function")


class PluginAttribution(Attribution):
    """Wraps ``fn(model, images, targets, **kwargs)`` named by ``method`` (a dotted path).

    Not registered under a name: the extraction stage builds one for every config entry whose
    ``method`` contains a dot. The function is imported when the method is built, so a bad path
    fails before any work is done.
    """

    name = "plugin"
    config = PluginConfig

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.function = import_object(self.params.method)
        if not callable(self.function):
            raise RoarError(f"plug-in '{self.params.method}' is a {type(self.function).__name__}, not a function")

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, generator, context
    ) -> torch.Tensor:
        with frozen(model) if model is not None else contextlib.nullcontext(), torch.enable_grad():
            out = self.function(model, images, targets, **self.params.kwargs)
        return as_attribution_map(out, images, self.params.method)

    def __repr__(self) -> str:
        return f"plugin({self.params.method}, {self.params.kwargs})"


def captum(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    attribution: str = "IntegratedGradients",
    layer: str | None = None,
    init_kwargs: dict | None = None,
    **attribute_kwargs: Any,
) -> torch.Tensor:
    """A plug-in running ``captum.attr.<attribution>``: ``.attribute(images, target=targets, **attribute_kwargs)``.

    Layer methods (``LayerGradCam``, ``LayerIntegratedGradients``, ...) need ``layer`` (a name as
    for ``gradcam``, ``auto`` included); their maps are summed over the layer's channels (which
    are not the image's) and upsampled bilinearly to the input's H×W. Note Captum's defaults,
    e.g. ``Saliency`` returns |gradient| unless ``abs=False``.
    """
    try:
        attr = importlib.import_module("captum.attr")
    except ImportError as error:
        raise RoarError("install the captum extra: pip install 'roar[captum]'") from error
    cls = getattr(attr, attribution, None)
    if not isinstance(cls, type):
        known = [name for name in dir(attr) if name[:1].isupper()]
        raise RoarError(f"captum.attr has no method '{attribution}'{closest(attribution, known)}")
    is_layer = attribution.startswith("Layer")
    if is_layer and layer is None:
        raise RoarError(f"captum {attribution} needs a 'layer' (a module name, or auto)")
    if layer is not None:
        _, module = resolve_layer(model, layer, images)
        method = cls(model, module, **(init_kwargs or {}))
    else:
        method = cls(model, **(init_kwargs or {}))
    if isinstance(method, attr.GradientAttribution):  # a leaf that requires grad: no warning, caller's tensor untouched
        images = images.detach().clone().requires_grad_(True)
    out = method.attribute(images, target=targets, **attribute_kwargs)
    if isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    if layer is not None and isinstance(out, torch.Tensor) and out.ndim == 4:
        out = out.sum(dim=1, keepdim=True)
        if out.shape[2:] != images.shape[2:]:
            out = F.interpolate(out.float(), size=images.shape[2:], mode="bilinear", align_corners=False)
    return out
