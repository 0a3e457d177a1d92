"""The dataset registry: ``DATASETS.create(cfg.name, cfg)`` builds any registered dataset."""

from roar.registry import Registry

DATASETS: Registry = Registry("dataset")
