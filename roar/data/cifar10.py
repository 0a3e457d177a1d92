"""``cifar10``: CIFAR-10 read with torchvision, the benchmark of the original ROAR paper.

The data lives under ``<root>/cifar10/cifar-10-batches-py`` (the folder of the official python
archive). Nothing is downloaded unless ``download: true``, so an offline run fails at once with
a message saying where to put the files instead of hanging on the network. Both splits are held
in memory as uint8 tensors; ``train_size``/``test_size`` take a seeded random subset for quick
runs. Normalisation uses the usual CIFAR-10 channel statistics, as in the ROAR reference code.
"""

from __future__ import annotations

import http.client
import tarfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from roar.core.errors import RoarError
from roar.core.schema import Seed
from roar.data.base import Dataset, DatasetConfig, TensorSplit, not_a_file, writable_folder
from roar.data.registry import DATASETS

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class Cifar10Config(DatasetConfig):
    name: Literal["cifar10"] = "cifar10"
    download: bool = Field(False, description="fetch the archive (about 170 MB) if it is not under root/cifar10")
    train_size: int | None = Field(None, ge=1, description="seeded random subset of the 50,000 training images")
    test_size: int | None = Field(None, ge=1, description="seeded random subset of the 10,000 test images")
    seed: Seed = Field(0, description="seed of the subsets")


def _files():
    from torchvision.datasets import CIFAR10

    return [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _fetch(root: Path) -> None:
    from torchvision.datasets import CIFAR10

    writable_folder(root, "dataset.root", "set dataset.root to a writable folder to download CIFAR-10 into")
    try:
        CIFAR10(str(root), train=True, download=True)
    except (OSError, RuntimeError, http.client.HTTPException, tarfile.TarError) as e:  # URLError is an OSError
        raise RoarError(
            f"could not download CIFAR-10 to {root} ({_one_line(e)}); without network access, put the extracted "
            f"'cifar-10-batches-py' folder in {root} and set dataset.download=false"
        ) from e


def _subset(split: TensorSplit, n: int | None, seed: int, what: str) -> TensorSplit:
    if n is None or n == len(split):
        return split
    if n > len(split):
        raise RoarError(f"dataset.{what}_size={n} exceeds the {len(split)} CIFAR-10 {what} images")
    keep = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    return TensorSplit(split.images[keep], split.labels[keep])


@DATASETS.register("cifar10", Cifar10Config)
def build_cifar10(cfg: Cifar10Config) -> Dataset:
    from torchvision.datasets import CIFAR10

    not_a_file(Path(cfg.root), "dataset.root", "set it to the folder that holds (or is to hold) cifar10/")
    root = Path(cfg.root) / "cifar10"
    folder = root / CIFAR10.base_folder
    if cfg.download:
        _fetch(root)
    missing = [name for name in _files() if not (folder / name).is_file()]
    if missing:
        raise RoarError(
            f"CIFAR-10 not found: expected the folder {folder} (with {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); put the extracted 'cifar-10-batches-py' folder in {root} "
            "or set dataset.download=true"
        )
    splits = {}
    for what, seed in (("train", 2 * cfg.seed), ("test", 2 * cfg.seed + 1)):
        try:
            data = CIFAR10(str(root), train=what == "train", download=False)
        except RuntimeError as e:
            raise RoarError(
                f"CIFAR-10 files in {folder} are damaged or not the official ones ({_one_line(e)}); "
                "delete the folder and set dataset.download=true"
            ) from e
        split = TensorSplit(np.ascontiguousarray(data.data.transpose(0, 3, 1, 2)), np.asarray(data.targets))
        splits[what] = _subset(split, getattr(cfg, f"{what}_size"), seed, what)
    return Dataset("cifar10", splits["train"], splits["test"], list(data.classes), MEAN, STD)
