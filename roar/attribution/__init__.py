"""Attribution methods, the HDF5 store of their maps, and the extraction stage.

``create(name, **params)`` returns a callable ``(model, images, targets) -> Tensor[B, C, H, W]``
(the raw, unreduced map, float32) for every registered method; ``list_methods()`` names them.
Importing this package registers the built-in methods of the modules listed below.
"""

from __future__ import annotations

from pydantic import ValidationError

# Importing these modules registers their methods.
from roar.attribution import (  # noqa: F401
    controls,
    gradcam,
    gradient,
    guided,
    integrated,
    lime,
    noise,
    oracle,
    pattern_methods,
    perturbation,
)
from roar.attribution.base import Attribution, Context, MethodConfig, explainer
from roar.attribution.plugins import PluginAttribution
from roar.attribution.registry import METHODS
from roar.core.errors import RoarError
from roar.core.schema import format_validation_error


def create(name: str, **params) -> Attribution:
    """A registered method by name, its parameters validated (unknown ones are errors)."""
    try:
        return METHODS.create(name, **params)
    except ValidationError as exc:
        raise RoarError(f"{name}: {format_validation_error(exc, params)}") from None


def list_methods() -> list[str]:
    return METHODS.names()


__all__ = [
    "METHODS",
    "Attribution",
    "Context",
    "MethodConfig",
    "PluginAttribution",
    "create",
    "explainer",
    "list_methods",
]
