"""What every dataset provides: uint8 images at a fixed evaluation geometry, labels, class
names, and ground-truth object masks where it has them.

Images stay uint8 in [0, 255] here. Everything downstream (ablation, attribution, ROAR fills)
works in [0, 1] space; normalisation happens inside the model (see ``roar.models``), so the one
geometry an image is attributed at is the one it is ablated and retrained at.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from roar.core.errors import RoarError
from roar.core.locks import check_writable_folder
from roar.core.schema import Section

# Codes of the per-example difficulty tag; datasets without tags report every example "clean".
TAGS = ("clean", "low_contrast", "occluded", "two_objects")


class DatasetConfig(Section):
    """Keys every dataset accepts."""

    root: Path = Path("data")


def not_a_file(path: Path, key: str, hint: str) -> Path:
    """``path`` unless it is a file where a folder belongs: then a RoarError naming ``key`` and the path."""
    if path.exists() and not path.is_dir():
        raise RoarError(f"{key} {path} is a file, not a folder: {hint}")
    return path


def writable_folder(folder: Path, key: str, hint: str) -> Path:
    """``folder``, created if missing, once it is known that a dataset can write in it; else a RoarError
    naming ``key`` and the path (a file in the way, or a folder without write permission)."""
    try:
        check_writable_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
    except RoarError as exc:
        raise RoarError(f"{key}: {exc}: {hint}") from None
    except OSError as exc:
        raise RoarError(f"{key}: cannot create {folder}: {exc.strerror or exc}: {hint}") from None
    return folder


class ImageSplit(torch.utils.data.Dataset):
    """One split: ``split[i]`` is ``(image uint8 [C, H, W], label)``.

    Small datasets hold all images in memory (``images`` is a tensor) so training and ablation
    can run on whole batches on the device; large ones (ImageNet) decode on demand and are
    read through a DataLoader.
    """

    labels: torch.Tensor  # int64 [N]
    images: torch.Tensor | None = None  # uint8 [N, C, H, W] when in memory
    masks: torch.Tensor | None = None  # uint8 [N, H, W]: 0 background, 1 labelled object, 2 other
    tags: torch.Tensor | None = None  # int64 [N], indices into TAGS
    other_labels: torch.Tensor | None = None  # int64 [N], class of the second object or -1

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def geometry(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: slice | Sequence[int] | torch.Tensor, num_workers: int = 0, pin_memory: bool = False):
        """uint8 images [len(rows), C, H, W] of ``rows`` (a slice, or indices): indexed in memory
        (a slice gives a view); decoded from disk in one batch by ``num_workers`` loader workers."""
        if self.in_memory:
            return self.images[rows if isinstance(rows, slice) else torch.as_tensor(rows)]
        rows = list(range(len(self))[rows]) if isinstance(rows, slice) else [int(r) for r in rows]
        subset = torch.utils.data.Subset(self, rows)
        loader = torch.utils.data.DataLoader(
            subset, batch_size=len(rows), num_workers=num_workers, pin_memory=pin_memory
        )
        return next(iter(loader))[0]

    def fingerprint(self) -> str:
        raise NotImplementedError

    def pair_evidence(self, index: int, a: int, b: int) -> torch.Tensor | None:
        """bool [H, W]: where image ``index`` shows what an ambiguity between classes ``a`` and ``b``
        should point at, or None when the split has no such ground truth.

        Default (object masks with a second object's label, as ``shapes`` has): the pixels of the
        objects whose class is ``a`` or ``b``. In such data only the objects carry class evidence
        (background, colour and position are independent of the class), so a network torn between
        the two classes can only have found that evidence there; an image with a second object of
        class ``b`` beside its labelled object of class ``a`` has both objects as its region.
        Datasets with part or segment annotations (``cub200``, ``ade20k``) define it their way.
        """
        if self.masks is None or self.other_labels is None:
            return None
        mask = self.masks[index]
        region = torch.zeros(mask.shape, dtype=torch.bool)
        if int(self.labels[index]) in (a, b):
            region |= mask == 1
        if int(self.other_labels[index]) in (a, b):
            region |= mask == 2
        return region


class TensorSplit(ImageSplit):
    """A split held in memory as tensors."""

    def __init__(self, images, labels, masks=None, tags=None, other_labels=None):
        self.images = torch.as_tensor(images, dtype=torch.uint8)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.masks = None if masks is None else torch.as_tensor(masks, dtype=torch.uint8)
        self.tags = None if tags is None else torch.as_tensor(tags, dtype=torch.int64)
        self.other_labels = None if other_labels is None else torch.as_tensor(other_labels, dtype=torch.int64)
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(f"images {tuple(self.images.shape)} and labels {len(self.labels)} do not match")
        self._fingerprint: str | None = None

    @property
    def geometry(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]

    def fingerprint(self) -> str:
        """sha256 of the pixels and labels: two stores made from the same split agree on it."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(np.ascontiguousarray(self.images.numpy()).tobytes())
            h.update(self.labels.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


@dataclass
class Dataset:
    """Both splits plus what is needed to normalise and describe them.

    ``mean`` and ``std`` are per channel in [0, 1] space: the mean is the default ROAR fill and
    both parametrise the model's normalisation layer.
    """

    name: str
    train: ImageSplit
    test: ImageSplit
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> ImageSplit:
        if name not in ("train", "test"):
            raise ValueError(f"unknown split '{name}': use 'train' or 'test'")
        return getattr(self, name)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.name}:{self.train.fingerprint()}:{self.test.fingerprint()}".encode())
        return h.hexdigest()[:16]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] space of uint8 images [N, C, H, W], in float64."""
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)
