"""``folder`` and ``imagenet``: any ImageFolder tree, decoded from disk on demand.

Layout: ``<root>/train/<class>/*.jpg`` and ``<root>/val/<class>/*.jpg`` (split folder names are
configurable). ImageNet is far too large to hold in memory, so a split keeps only the file list
and labels and decodes one image per ``split[i]``, at the standard evaluation geometry: shorter
side resized to ``resize``, then a centre crop of ``crop``. Every stage sees that one geometry, so
the image a method attributes is the image that is ablated and retrained on. Fingerprints come
from paths, sizes and labels, never pixels, so they cost a directory listing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from roar.core.errors import RoarError
from roar.data.base import Dataset, DatasetConfig, ImageSplit, not_a_file
from roar.data.registry import DATASETS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0, le=1.0)]


class GeometryConfig(DatasetConfig):
    """Keys of a dataset decoded on demand at one evaluation geometry, normalised with given statistics."""

    resize: int = Field(256, ge=8, le=4096, description="shorter image side after resizing")
    crop: int = Field(224, ge=8, le=4096, description="side of the centre crop taken after resizing")
    mean: tuple[Unit, Unit, Unit] = IMAGENET_MEAN
    std: tuple[Positive, Positive, Positive] = IMAGENET_STD

    @field_validator("crop")
    @classmethod
    def _crop_fits(cls, crop: int, info: ValidationInfo) -> int:
        resize = info.data.get("resize")
        if resize is not None and crop > resize:
            raise ValueError(f"must not exceed resize ({resize})")
        return crop


class FolderConfig(GeometryConfig):
    name: Literal["folder"] = "folder"
    root: Path | None = Field(None, description="folder holding <train_dir>/<class>/* and <test_dir>/<class>/*")
    train_dir: str = "train"
    test_dir: str = "val"


class ImageNetConfig(FolderConfig):
    name: Literal["imagenet"] = "imagenet"
    root: Path | None = Field(
        Path("data/imagenet"), description="ILSVRC-2012 as train/<wnid>/*.JPEG, val/<wnid>/*.JPEG"
    )


def load_image(path: str | Path, resize: int, crop: int) -> torch.Tensor:
    """One file → uint8 [3, crop, crop]: RGB, shorter side ``resize`` (antialiased), centre crop."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # decodes every pixel: grey, palette, RGBA and CMYK become RGB
    except Image.UnidentifiedImageError as e:
        reason = "PIL cannot identify it as an image (empty, damaged or of an unknown format)"
        raise RoarError(f"cannot read image {path}: {reason}: replace or remove the file") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated, corrupt data
        reason = getattr(e, "strerror", None) or e  # an errno's text alone: the path is named already
        raise RoarError(f"cannot read image {path}: {reason}: replace or remove the file") from e
    x = F.pil_to_tensor(rgb)
    x = F.resize(x, resize, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return F.center_crop(x, [crop, crop])


class FolderSplit(ImageSplit):
    """A split read from ``<directory>/<class>/<file>``: file list in memory, pixels on disk."""

    def __init__(self, directory: Path, classes: list[str], resize: int, crop: int):
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        self.directory = Path(directory)
        self.resize, self.crop = resize, crop
        class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise RoarError(
                f"no images in {directory}: expected {directory}/<class>/*.jpg (extensions {', '.join(IMG_EXTENSIONS)})"
            )
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        self._fingerprint: str | None = None

    @property
    def geometry(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop)

    def __getitem__(self, index: int):
        path = self.samples[index][0]
        return load_image(path, self.resize, self.crop), self.labels[index]

    def fingerprint(self) -> str:
        """sha256 of the geometry and the sorted (relative path, size, label) of every file."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.resize}:{self.crop}\n".encode())
            rows = sorted((Path(p).relative_to(self.directory).as_posix(), label) for p, label in self.samples)
            for rel, label in rows:
                size = os.stat(self.directory / rel).st_size
                h.update(f"{rel}\0{size}\0{label}\n".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def _classes(directory: Path, layout: str, key: str) -> list[str]:
    not_a_file(directory, key, f"expected the layout {layout}")
    if not directory.is_dir():
        raise RoarError(f"image folder split not found: {directory}; expected the layout {layout}")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not classes:
        raise RoarError(f"no class folders in {directory}: expected {directory}/<class>/*.jpg")
    return classes


def _differences(a: list[str], b: list[str]) -> str:
    only = sorted(set(a) - set(b))
    if not only:
        return "none"
    return ", ".join(only[:5]) + (f" and {len(only) - 5} more" if len(only) > 5 else "")


def build_folder(cfg: FolderConfig) -> Dataset:
    if cfg.root is None:
        raise RoarError(
            f"dataset.root must point to an image folder laid out as <root>/{cfg.train_dir}/<class>/*.jpg "
            f"and <root>/{cfg.test_dir}/<class>/*.jpg"
        )
    root = Path(cfg.root)
    layout = f"{root}/{cfg.train_dir}/<class>/*.jpg and {root}/{cfg.test_dir}/<class>/*.jpg"
    not_a_file(root, "dataset.root", f"set it to the image folder laid out as {layout}")
    if not root.is_dir():
        raise RoarError(f"image folder {root} not found: expected {layout} (set dataset.root)")
    train_classes = _classes(root / cfg.train_dir, layout, "dataset.train_dir")
    test_classes = _classes(root / cfg.test_dir, layout, "dataset.test_dir")
    if train_classes != test_classes:
        raise RoarError(
            f"{root / cfg.train_dir} and {root / cfg.test_dir} have different class folders: "
            f"only in {cfg.train_dir}: {_differences(train_classes, test_classes)}; "
            f"only in {cfg.test_dir}: {_differences(test_classes, train_classes)}"
        )
    train = FolderSplit(root / cfg.train_dir, train_classes, cfg.resize, cfg.crop)
    test = FolderSplit(root / cfg.test_dir, test_classes, cfg.resize, cfg.crop)
    info = {"root": str(root), "resize": cfg.resize, "crop": cfg.crop}
    return Dataset(cfg.name, train, test, train_classes, tuple(cfg.mean), tuple(cfg.std), info=info)


DATASETS.register("folder", FolderConfig)(build_folder)
DATASETS.register("imagenet", ImageNetConfig)(build_folder)
