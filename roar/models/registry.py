"""The model registry: ``MODELS.create(cfg.name, cfg, num_classes=..., in_channels=...)``."""

from roar.registry import Registry

MODELS: Registry = Registry("model")
