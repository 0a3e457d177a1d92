"""Models: one registry; every network is wrapped in ``Classifier`` (normalisation inside).

Importing this package registers the built-in models listed below.
"""

from __future__ import annotations

from roar.models import mlp, resnet8, resnet50  # noqa: F401  (register "mlp", "resnet8", "resnet50")
from roar.models.base import Classifier, ModelConfig
from roar.models.registry import MODELS


def build_model(cfg: ModelConfig, num_classes: int, geometry: tuple[int, ...], mean, std) -> Classifier:
    """The configured network for ``num_classes`` classes of inputs shaped ``geometry``."""
    net = MODELS.create(cfg.name, cfg, num_classes=num_classes, geometry=tuple(geometry))
    return Classifier(net, mean, std)


__all__ = ["MODELS", "Classifier", "ModelConfig", "build_model"]
