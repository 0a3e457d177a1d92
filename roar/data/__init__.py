"""Datasets: one registry, every entry yielding uint8 images at its evaluation geometry.

Importing this package registers the built-in datasets listed below.
"""

from roar.data import ade20k, cifar10, cub200, digits, folder, shapes  # noqa: F401  (register the built-in datasets)
from roar.data.base import TAGS, Dataset, DatasetConfig, ImageSplit, TensorSplit
from roar.data.registry import DATASETS


def build_dataset(cfg: DatasetConfig) -> Dataset:
    """The dataset a validated config section describes."""
    return DATASETS.create(cfg.name, cfg)


__all__ = ["DATASETS", "TAGS", "Dataset", "DatasetConfig", "ImageSplit", "TensorSplit", "build_dataset"]
