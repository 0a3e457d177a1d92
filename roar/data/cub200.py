"""``cub200``: Caltech-UCSD Birds-200-2011, 200 bird species, with part locations and attributes.

Layout under ``dataset.root`` (which may also be the ``CUB_200_2011`` folder itself)::

    CUB_200_2011/images.txt                  <image id> <path under images/>
    CUB_200_2011/image_class_labels.txt      <image id> <class id, 1-based>
    CUB_200_2011/train_test_split.txt        <image id> <1 train | 0 test>
    CUB_200_2011/classes.txt                 <class id> <NNN.Class_name>
    CUB_200_2011/images/<class folder>/<file>.jpg
    CUB_200_2011/parts/parts.txt             <part id> <part name>          (15 parts)
    CUB_200_2011/parts/part_locs.txt         <image id> <part id> <x> <y> <visible>
    CUB_200_2011/attributes/attributes.txt   <attribute id> <has_group::value>
    CUB_200_2011/attributes/class_attribute_labels_continuous.txt   one row per class, one % per attribute

Images are decoded on demand at the evaluation geometry of ``folder`` (shorter side ``resize``,
centre crop ``crop``); keypoints go through the same resize and crop by their coordinates.

Ground truth of an ambiguity (``pair_evidence``): the parts two species *share*. A classifier
torn between two species can only be torn by what they have in common; in CUB that is described
per part by the class-level attributes (colour, shape, pattern of the bill, wing, crown, ...).
Each attribute belongs to the parts its group names (``ATTRIBUTE_PARTS``); whole-bird attributes
(size, shape, primary colour) and the head pattern, which spans several head parts at once, belong
to none. A part is shared by classes a and b when the cosine similarity of their attribute
vectors restricted to that part reaches ``shared_threshold``; the evidence is the union of disks
of radius ``part_radius`` (a fraction of the crop side) around the visible keypoints of the
shared parts. Part locations and attributes are read on the first ``pair_evidence``, not when the
dataset is built: training needs only the image lists (and parts.txt, to name the parts).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from roar.core.errors import RoarError
from roar.data.annotated import dataset_folder, flag, read_mapping, read_table, shorten, word
from roar.data.base import Dataset, ImageSplit
from roar.data.folder import GeometryConfig, load_image
from roar.data.registry import DATASETS

INNER = "CUB_200_2011"
LAYOUT = (
    "<root>/CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, "
    "images/<class folder>/*.jpg, parts/parts.txt, parts/part_locs.txt, attributes/attributes.txt and "
    "attributes/class_attribute_labels_continuous.txt"
)
FILES = (
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "classes.txt",
    "parts/parts.txt",
    "parts/part_locs.txt",
    "attributes/attributes.txt",
    "attributes/class_attribute_labels_continuous.txt",
)

# Attribute group prefix → the parts it describes. Groups not listed here (has_size, has_shape,
# has_primary_color, has_head_pattern) describe the whole bird or several parts at once.
ATTRIBUTE_PARTS: dict[str, tuple[str, ...]] = {
    "has_bill_": ("beak",),
    "has_wing_": ("left wing", "right wing"),
    "has_eye_": ("left eye", "right eye"),
    "has_leg_": ("left leg", "right leg"),
    "has_crown_": ("crown",),
    "has_forehead_": ("forehead",),
    "has_nape_": ("nape",),
    "has_throat_": ("throat",),
    "has_breast_": ("breast",),
    "has_belly_": ("belly",),
    "has_back_": ("back",),
    "has_upperparts_": ("back",),
    "has_underparts_": ("belly", "breast"),
    "has_tail_": ("tail",),
    "has_upper_tail_": ("tail",),
    "has_under_tail_": ("tail",),
}


class Cub200Config(GeometryConfig):
    name: Literal["cub200"] = "cub200"
    root: Path = Field(Path("data/cub200"), description="folder holding CUB_200_2011/ (or that folder itself)")
    shared_threshold: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="cosine similarity of two classes' attributes of a part from which the part counts as shared",
    )
    part_radius: float = Field(
        0.06, gt=0.0, le=1.0, description="radius of the evidence disk around a keypoint, as a fraction of crop"
    )


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise RoarError(f"cannot read image {path}: {reason}: replace or remove the file") from e


# ---------------------------------------------------------------- geometry


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``resize``, rounded as torchvision's resize does."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def crop_anchor(width: int, height: int, crop: int) -> tuple[int, int]:
    """(left, top) of the centre crop of side ``crop``, rounded as torchvision's centre crop does."""
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def to_crop(points: np.ndarray, size: tuple[int, int], resize: int, crop: int) -> np.ndarray:
    """Keypoints ``points`` [K, 2] (x, y in pixels of the original image of ``size`` = (width, height),
    (x, y) being the centre of pixel column x, row y) → continuous coordinates in the crop, where pixel
    column j spans [j, j + 1). The image is resized with pixel centres aligned (torchvision's bilinear
    resize), so a centre x + 0.5 scales by new / old on each axis."""
    width, height = size
    new_w, new_h = resized_size(width, height, resize)
    left, top = crop_anchor(new_w, new_h, crop)
    u = (points[:, 0] + 0.5) * new_w / width - left
    v = (points[:, 1] + 0.5) * new_h / height - top
    return np.stack([u, v], axis=1)


def disks(centres: np.ndarray, radius: float, side: int) -> torch.Tensor:
    """bool [side, side]: the pixels whose centres lie within ``radius`` of any of ``centres`` [K, 2] (u, v)."""
    grid = np.arange(side) + 0.5
    region = np.zeros((side, side), dtype=bool)
    for u, v in centres:
        region |= (grid[None, :] - u) ** 2 + (grid[:, None] - v) ** 2 <= radius**2
    return torch.from_numpy(region)


# ---------------------------------------------------------------- part sharing


def attribute_parts(attributes: list[str], parts: list[str]) -> np.ndarray:
    """bool [attributes, parts]: which parts each attribute (``has_group::value``) describes, by ``ATTRIBUTE_PARTS``."""
    table = np.zeros((len(attributes), len(parts)), dtype=bool)
    column = {name: k for k, name in enumerate(parts)}
    for i, attribute in enumerate(attributes):
        group = attribute.split("::")[0]
        for prefix, names in ATTRIBUTE_PARTS.items():
            if group.startswith(prefix):
                table[i, [column[name] for name in names]] = True
    return table


def part_sharing(attributes: np.ndarray, parts_of: np.ndarray, threshold: float) -> np.ndarray:
    """bool [classes, classes, parts]: whether two classes share each part.

    ``attributes`` [classes, attributes] are class-level attribute strengths (CUB's percentages of
    images showing each attribute), ``parts_of`` [attributes, parts] assigns attributes to parts.
    Two classes share a part when the cosine similarity of their attributes of that part is at
    least ``threshold``. The cosine compares what is said about the part (which colours, shapes,
    patterns and in what proportions), not how often annotators spoke of it; a threshold turns
    that graded similarity into the yes/no a region needs. With non-negative strengths the cosine
    lies in [0, 1]: 1 is the same description, 0.8 (the default) allows some disagreement in the
    minor attributes, 0 shares every part both describe. A part a class has no attribute of (all
    strengths 0) is never shared: there is nothing to be alike in.
    """
    classes, parts = len(attributes), parts_of.shape[1]
    shared = np.zeros((classes, classes, parts), dtype=bool)
    for p in range(parts):
        x = attributes[:, parts_of[:, p]].astype(np.float64)
        norms = np.linalg.norm(x, axis=1)
        described = norms > 0
        unit = x / np.where(described, norms, 1.0)[:, None]
        cosine = unit @ unit.T
        shared[:, :, p] = (cosine >= threshold - 1e-9) & described[:, None] & described[None, :]
    return shared


def read_parts(folder: Path) -> tuple[list[int], list[str]]:
    """Part ids and (lower-case) names of parts/parts.txt, in file order; every part named in
    ``ATTRIBUTE_PARTS`` must be among them."""
    path = folder / "parts" / "parts.txt"
    rows = [row for _, row in read_table(path, (int, str), "<part id> <part name>")]
    ids, names = [i for i, _ in rows], [name.lower() for _, name in rows]
    needed = sorted({part for parts in ATTRIBUTE_PARTS.values() for part in parts})
    missing = [part for part in needed if part not in names]
    if missing:
        raise RoarError(f"{path} lists no part '{missing[0]}': expected CUB's 15 parts ({', '.join(needed)})")
    return ids, names


class CubParts:
    """Part locations and the part-sharing table, read once on first use and shared by both splits.

    Only parts.txt (15 lines) is read when the dataset is built; the 176,000 part locations and the
    attribute table wait for the first ``pair_evidence``.
    """

    def __init__(self, folder: Path, num_classes: int, threshold: float):
        self.folder, self.num_classes, self.threshold = folder, num_classes, threshold
        self.ids, self.names = read_parts(folder)
        self._locations: dict[int, np.ndarray] | None = None
        self._shared: np.ndarray | None = None

    def locations(self, image_id: int) -> np.ndarray:
        """float [parts, 3]: x, y, visible of every part of image ``image_id`` (absent parts invisible)."""
        if self._locations is None:
            self._locations = self._read_locations({part: k for k, part in enumerate(self.ids)})
        return self._locations.get(image_id, np.zeros((len(self.names), 3)))

    def shared(self, a: int, b: int) -> np.ndarray:
        """bool [parts]: the parts classes ``a`` and ``b`` share."""
        for c in (a, b):
            if not 0 <= c < self.num_classes:
                raise IndexError(f"class {c} out of range for {self.num_classes} classes")
        if self._shared is None:
            attributes, strengths = self._read_attributes()
            self._shared = part_sharing(strengths, attribute_parts(attributes, self.names), self.threshold)
        return self._shared[a, b]

    def _read_locations(self, column: dict[int, int]) -> dict[int, np.ndarray]:
        path = self.folder / "parts" / "part_locs.txt"
        layout = "<image id> <part id> <x> <y> <visible 0/1>"
        locations: dict[int, np.ndarray] = {}
        for number, (image, part, x, y, visible) in read_table(path, (int, int, float, float, float), layout):
            if part not in column:
                raise RoarError(f"{path} line {number}: part {part} is not listed in parts/parts.txt")
            row = locations.setdefault(image, np.zeros((len(column), 3)))
            row[column[part]] = (x, y, visible)
        return locations

    def _read_attributes(self) -> tuple[list[str], np.ndarray]:
        listed = read_table(self.folder / "attributes" / "attributes.txt", (int, word), "<id> <has_group::value>")
        names = [name for _, (_, name) in listed]
        path = self.folder / "attributes" / "class_attribute_labels_continuous.txt"
        rows = []
        for number, (line,) in read_table(path, (str,), "one percentage per attribute"):
            values = line.split()
            try:
                if len(values) != len(names):
                    raise ValueError
                rows.append([float(v) for v in values])
            except ValueError:
                raise RoarError(
                    f"{path} line {number}: expected {len(names)} numbers (one per line of attributes.txt), "
                    f"got '{shorten(line)}'"
                ) from None
        if len(rows) != self.num_classes:
            raise RoarError(f"{path} has {len(rows)} rows: expected one per class of classes.txt ({self.num_classes})")
        return names, np.asarray(rows)


# ---------------------------------------------------------------- splits


class CubSplit(ImageSplit):
    """One CUB split: file list and labels in memory, pixels on disk, part evidence from ``parts``."""

    def __init__(self, folder: Path, files: list[str], ids: list[int], labels: list[int], cfg: Cub200Config, parts):
        self.folder, self.files, self.ids = folder, files, ids
        self.resize, self.crop, self.radius = cfg.resize, cfg.crop, cfg.part_radius
        self.parts: CubParts = parts
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self._fingerprint: str | None = None

    @property
    def geometry(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop)

    def __getitem__(self, index: int):
        return load_image(self.folder / "images" / self.files[index], self.resize, self.crop), self.labels[index]

    def fingerprint(self) -> str:
        """sha256 of the geometry and the sorted (relative path, size, label) of every image."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.resize}:{self.crop}\n".encode())
            for rel, label in sorted(zip(self.files, self.labels.tolist())):
                size = os.stat(self.folder / "images" / rel).st_size
                h.update(f"{rel}\0{size}\0{label}\n".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def keypoints(self, index: int) -> np.ndarray:
        """float [parts, 3]: u, v in the crop and whether the part is visible there (1.0) or not (0.0)."""
        locations = self.parts.locations(self.ids[index])
        size = image_size(self.folder / "images" / self.files[index])
        uv = to_crop(locations[:, :2], size, self.resize, self.crop)
        inside = (uv >= 0).all(axis=1) & (uv < self.crop).all(axis=1)
        return np.concatenate([uv, ((locations[:, 2] > 0) & inside)[:, None].astype(float)], axis=1)

    def pair_evidence(self, index: int, a: int, b: int) -> torch.Tensor:
        """bool [crop, crop]: disks around the visible keypoints of the parts classes ``a`` and ``b`` share."""
        shared = self.parts.shared(a, b)
        if not shared.any():
            return torch.zeros(self.crop, self.crop, dtype=torch.bool)
        points = self.keypoints(index)
        chosen = points[shared & (points[:, 2] > 0), :2]
        return disks(chosen, self.radius * self.crop, self.crop)


# ---------------------------------------------------------------- building


def _read_ids(folder: Path, name: str, layout: str, convert: Callable[[str], Any] = int) -> dict[int, Any]:
    """{image id: value} of a two-column file of ``folder``; an id given twice is an error."""
    return read_mapping(folder / name, (int, convert), layout, "id")


def _class_names(folder: Path) -> list[str]:
    """Class names of classes.txt in id order, without the 'NNN.' prefix of their folders."""
    path = folder / "classes.txt"
    rows = sorted(row for _, row in read_table(path, (int, word), "<class id> <NNN.Class_name>"))
    if [i for i, _ in rows] != list(range(1, len(rows) + 1)):
        raise RoarError(f"{path}: class ids must run from 1 to {len(rows)}")
    if len(rows) < 2:
        raise RoarError(f"{path} lists {len(rows)} class(es): a classifier needs at least 2")
    return [re.sub(r"^\d+\.", "", name) for _, name in rows]


def _image_files(folder: Path) -> set[str]:
    """Every file under images/, as a path relative to it (one directory walk, not one stat per image)."""
    base = folder / "images"
    return {
        os.path.relpath(os.path.join(top, name), base).replace(os.sep, "/")
        for top, _, names in os.walk(base)
        for name in names
    }


def _samples(folder: Path, num_classes: int) -> dict[int, tuple[str, int, bool]]:
    """{image id: (path under images/, 0-based label, is_train)} from the three image lists."""
    files = _read_ids(folder, "images.txt", "<image id> <path under images/>", word)
    labels = _read_ids(folder, "image_class_labels.txt", "<image id> <class id>")
    is_train = _read_ids(folder, "train_test_split.txt", "<image id> <1 train | 0 test>", flag)
    present = _image_files(folder)
    samples = {}
    for image_id, rel in files.items():
        for table, name in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise RoarError(f"{folder / name} has no line for image id {image_id} of images.txt")
        if not 1 <= labels[image_id] <= num_classes:
            raise RoarError(
                f"{folder / 'image_class_labels.txt'}: image id {image_id} has class {labels[image_id]}, "
                f"outside 1..{num_classes} of classes.txt"
            )
        if rel not in present:
            raise RoarError(f"image {folder / 'images' / rel} listed in images.txt (id {image_id}) is missing")
        samples[image_id] = (rel, labels[image_id] - 1, bool(is_train[image_id]))
    return samples


def _split(folder: Path, samples: dict, train: bool, cfg: Cub200Config, parts: CubParts) -> CubSplit:
    ids = sorted(i for i, (_, _, is_train) in samples.items() if is_train == train)
    if not ids:
        raise RoarError(f"{folder / 'train_test_split.txt'} puts no image in the {'train' if train else 'test'} split")
    return CubSplit(folder, [samples[i][0] for i in ids], ids, [samples[i][1] for i in ids], cfg, parts)


def build_cub200(cfg: Cub200Config) -> Dataset:
    folder = dataset_folder(Path(cfg.root), INNER, "images.txt", LAYOUT)
    for name in FILES:
        if not (folder / name).is_file():
            raise RoarError(f"CUB-200-2011 file missing: {folder / name}; expected {LAYOUT}")
    classes = _class_names(folder)
    samples = _samples(folder, len(classes))
    parts = CubParts(folder, len(classes), cfg.shared_threshold)
    train, test = _split(folder, samples, True, cfg, parts), _split(folder, samples, False, cfg, parts)
    info = {
        "root": str(cfg.root),
        "resize": cfg.resize,
        "crop": cfg.crop,
        "parts": parts.names,
        "shared_threshold": cfg.shared_threshold,
        "part_radius": cfg.part_radius,
    }
    return Dataset(cfg.name, train, test, classes, tuple(cfg.mean), tuple(cfg.std), info=info)


DATASETS.register("cub200", Cub200Config)(build_cub200)
