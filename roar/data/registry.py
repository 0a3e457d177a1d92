"""The dataset registry: ``DATASETS.create(cfg.name, cfg)`` builds any registered dataset."""

from roar.core.registry import Registry

DATASETS: Registry = Registry("dataset")
