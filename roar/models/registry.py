"""The model registry: ``MODELS.create(cfg.name, cfg, num_classes=..., in_channels=...)``."""

from roar.core.registry import Registry

MODELS: Registry = Registry("model")
