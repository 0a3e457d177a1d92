"""``ade20k``: scene classification on ADE20K (the SceneParsing release), with object segmentations.

Layout under ``dataset.root`` (which may also be the ``ADEChallengeData2016`` folder itself)::

    ADEChallengeData2016/images/{training,validation}/<name>.jpg
    ADEChallengeData2016/annotations/{training,validation}/<name>.png   object label per pixel, 0 = unlabelled
    ADEChallengeData2016/sceneCategories.txt                            <name> <scene>, one line per image
    ADEChallengeData2016/objectInfo150.txt                              header, then Idx Ratio Train Val Name

The label of an image is its scene. ADE20K has hundreds of scenes, most with a handful of images,
so only scenes with at least ``min_images`` training images are classes (or the explicit list
``scenes``), sorted by name; images of other scenes are left out of both splits. Images are
decoded on demand at the evaluation geometry of ``folder``; annotations go through the same resize
(nearest neighbour, pixel centres aligned) and crop.

Ground truth of an ambiguity (``pair_evidence``): the objects two scenes *share*. Scenes differ by
the objects in them; a classifier torn between a bedroom and a hotel room is torn by the beds and
lamps that both have, not by the one object only one has. An object is *typical* of a scene when
it appears in at least ``object_share`` of that scene's training images; the evidence of an image
for scenes a and b is its pixels of the objects typical of both. Which objects each training
image contains is read from every training annotation once, on the first ``pair_evidence`` (never
when the dataset is built), and cached under ``cache_dir`` (default: the dataset folder) keyed by
the list and sizes of the annotation files.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from roar.core.atomic import replace_atomic
from roar.core.errors import RoarError
from roar.core.registry import closest
from roar.data.annotated import dataset_folder, read_mapping, read_table, word
from roar.data.base import Dataset, ImageSplit, writable_folder
from roar.data.folder import GeometryConfig, load_image
from roar.data.registry import DATASETS

INNER = "ADEChallengeData2016"
SPLITS = ("training", "validation")
LAYOUT = (
    "<root>/ADEChallengeData2016/ with images/{training,validation}/*.jpg, "
    "annotations/{training,validation}/*.png, sceneCategories.txt and objectInfo150.txt"
)
CACHE = "ade20k_object_presence.npz"
CACHE_VERSION = 1  # bump when what the presence table means changes: invalidates caches


class Ade20kConfig(GeometryConfig):
    name: Literal["ade20k"] = "ade20k"
    root: Path = Field(Path("data/ade20k"), description="folder holding ADEChallengeData2016/ (or that folder itself)")
    min_images: int = Field(50, ge=1, description="a scene is a class when it has at least this many training images")
    scenes: list[str] | None = Field(None, description="the scenes to classify, instead of those with min_images")
    object_share: float = Field(
        0.3, gt=0.0, le=1.0, description="an object is typical of a scene when in at least this share of its images"
    )
    cache_dir: Path | None = Field(None, description="folder of the object presence cache (default: dataset folder)")


# ---------------------------------------------------------------- lists


def read_scenes(folder: Path) -> dict[str, str]:
    """{image name: scene} of sceneCategories.txt."""
    return read_mapping(folder / "sceneCategories.txt", (word, word), "<image name> <scene>", "image")


def read_objects(folder: Path) -> list[str]:
    """Object names of objectInfo150.txt by label (label k is entry k - 1); labels must run 1, 2, ..."""
    path = folder / "objectInfo150.txt"
    layout = "<Idx> <Ratio> <Train> <Val> <Name>, tab-separated, after a header line"
    names = []
    for number, (index, _, _, _, name) in read_table(path, (str, str, str, str, str), layout):
        if number == 1 and index.lower() == "idx":
            continue
        if index != str(len(names) + 1):
            raise RoarError(f"{path} line {number}: expected object {len(names) + 1}, got '{index}' ({layout})")
        names.append(name)
    if not names:
        raise RoarError(f"{path} lists no objects: expected {layout}")
    return names


def image_names(folder: Path, split: str) -> list[str]:
    """Sorted names (without .jpg) of the images of one split folder."""
    directory = folder / "images" / split
    if not directory.is_dir():
        raise RoarError(f"ADE20K folder missing: {directory}; expected {LAYOUT}")
    return sorted(entry.name[:-4] for entry in os.scandir(directory) if entry.name.lower().endswith(".jpg"))


def check_listed(folder: Path, scenes: dict[str, str], found: dict[str, list[str]]) -> None:
    """Every image has a scene, and every scene line an image: else the first mismatch, as a RoarError."""
    seen = set()
    for split, names in found.items():
        for name in names:
            if name not in scenes:
                raise RoarError(f"image {folder / 'images' / split / name}.jpg has no line in sceneCategories.txt")
        seen.update(names)
    for name in scenes:
        if name not in seen:
            where = " or ".join(str(folder / "images" / split / f"{name}.jpg") for split in found)
            raise RoarError(f"image {name} listed in {folder / 'sceneCategories.txt'} is missing: no {where}")


def choose_scenes(counts: dict[str, int], cfg: Ade20kConfig) -> list[str]:
    """The class names: ``cfg.scenes`` (checked) or the scenes with at least ``cfg.min_images`` training images."""
    if cfg.scenes is not None:
        for scene in cfg.scenes:
            if scene not in counts:
                known = sorted(counts)
                raise RoarError(
                    f"dataset.scenes: unknown scene '{scene}'{closest(scene, known)}; "
                    f"the training images have {len(known)} scenes, e.g. {', '.join(known[:5])}"
                )
        chosen = sorted(set(cfg.scenes))
    else:
        chosen = sorted(scene for scene, n in counts.items() if n >= cfg.min_images)
    if len(chosen) < 2:
        most = max(counts.values(), default=0)
        raise RoarError(
            f"dataset.min_images={cfg.min_images} keeps {len(chosen)} scene(s), a classifier needs at least 2 "
            f"(the largest scene has {most} training images): lower dataset.min_images or list dataset.scenes"
            if cfg.scenes is None
            else f"dataset.scenes lists {len(chosen)} distinct scene(s): a classifier needs at least 2"
        )
    return chosen


# ---------------------------------------------------------------- annotations


def read_annotation(path: Path, objects: int) -> np.ndarray:
    """uint8 [H, W] object labels of one annotation PNG; a missing, unreadable or out-of-range map is a RoarError."""
    from PIL import Image

    if not path.is_file():
        raise RoarError(f"ADE20K annotation missing: {path}; expected {LAYOUT}")
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P"):
                raise RoarError(f"annotation {path} is not a label map (mode {image.mode}): expected an 8-bit PNG")
            labels = np.array(image, dtype=np.uint8)  # a writable copy: torch wraps it as it is
    except (OSError, SyntaxError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise RoarError(f"cannot read annotation {path}: {reason}: replace the file") from e
    if labels.size and int(labels.max()) > objects:
        raise RoarError(
            f"annotation {path} has label {int(labels.max())}, beyond the {objects} objects of objectInfo150.txt"
        )
    return labels


def fit_annotation(labels: np.ndarray, resize: int, crop: int) -> torch.Tensor:
    """uint8 [crop, crop]: a label map resized (nearest neighbour) and centre-cropped as ``load_image`` does images."""
    from torchvision.transforms.v2 import functional as F

    x = torch.from_numpy(np.ascontiguousarray(labels))[None]  # [1, H, W]: resized like an image
    x = F.resize(x, resize, interpolation=F.InterpolationMode.NEAREST_EXACT, antialias=False)
    return F.center_crop(x, [crop, crop])[0]


def annotation_fingerprint(directory: Path, names: list[str], objects: int) -> str:
    """sha256 of the names and sizes of the annotation files (and of the number of objects), never their pixels."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{objects}\n".encode())
    for name in names:
        h.update(f"{name}\0{os.stat(directory / f'{name}.png').st_size}\n".encode())
    return h.hexdigest()[:16]


def object_presence(directory: Path, names: list[str], objects: int) -> np.ndarray:
    """bool [images, objects + 1]: which object labels each annotation of ``names`` contains (one pass over them)."""
    from tqdm import tqdm

    presence = np.zeros((len(names), objects + 1), dtype=bool)
    for row, name in enumerate(tqdm(names, desc="ADE20K object presence", unit="image", leave=False)):
        labels = read_annotation(directory / f"{name}.png", objects)
        presence[row] = np.bincount(labels.ravel(), minlength=objects + 1)[: objects + 1] > 0
    return presence


def load_presence(path: Path, fingerprint: str) -> np.ndarray | None:
    """The cached presence table if ``path`` holds one of ``fingerprint``; None when absent, stale or damaged."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["fingerprint"]) != fingerprint:
                return None
            return cached["presence"].astype(bool)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def save_presence(path: Path, fingerprint: str, presence: np.ndarray) -> None:
    """Write the presence table and its fingerprint to ``path`` atomically (never a torn cache)."""
    replace_atomic(path, lambda f: np.savez_compressed(f, fingerprint=np.array(fingerprint), presence=presence))


def annotated_names(directory: Path) -> list[str]:
    """Sorted names (without .png) of the annotations in ``directory``."""
    if not directory.is_dir():
        raise RoarError(f"ADE20K folder missing: {directory}; expected {LAYOUT}")
    return sorted(entry.name[:-4] for entry in os.scandir(directory) if entry.name.lower().endswith(".png"))


class SceneObjects:
    """Which objects are typical of which scene, from the training annotations; computed (or read from
    the cache) on first use and shared by both splits.

    Presence is computed for every training annotation, whatever scenes are classes, so changing
    ``min_images``, ``scenes`` or ``object_share`` reuses the cache.
    """

    def __init__(self, folder: Path, objects: int, classes: int, train: tuple[list[str], list[int]], cfg: Ade20kConfig):
        self.folder, self.objects, self.classes = folder, objects, classes
        self.train_names, self.train_scenes = train[0], np.asarray(train[1], dtype=np.int64)
        self.share = cfg.object_share
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir is not None else folder
        self._typical: np.ndarray | None = None

    def shared(self, a: int, b: int) -> np.ndarray:
        """bool [objects + 1]: the object labels typical of both scene ``a`` and scene ``b`` (label 0 never)."""
        for c in (a, b):
            if not 0 <= c < self.classes:
                raise IndexError(f"class {c} out of range for {self.classes} classes")
        if self._typical is None:
            self._typical = self.typical()
        return self._typical[a] & self._typical[b]

    def typical(self) -> np.ndarray:
        """bool [scenes, objects + 1]: objects in at least ``object_share`` of each scene's training images."""
        names, presence = self.presence()
        rows = {name: k for k, name in enumerate(names)}
        table = presence[[rows[name] for name in self.train_names]]
        shares = np.stack([table[self.train_scenes == c].mean(axis=0) for c in range(self.classes)])
        typical = shares >= self.share - 1e-9
        typical[:, 0] = False  # 'other / unlabelled' is no object
        return typical

    def presence(self) -> tuple[list[str], np.ndarray]:
        """Names of all training annotations and bool [names, objects + 1], from the cache when it is current."""
        directory = self.folder / "annotations" / "training"
        names = annotated_names(directory)
        missing = sorted(set(self.train_names) - set(names))
        if missing:
            raise RoarError(f"ADE20K annotation missing: {directory / missing[0]}.png; expected {LAYOUT}")
        fingerprint = annotation_fingerprint(directory, names, self.objects)
        path = self.cache_dir / CACHE
        presence = load_presence(path, fingerprint)
        if presence is None:  # known writable before the long pass, not after it
            hint = "set dataset.cache_dir to a writable folder for the ADE20K object presence cache"
            writable_folder(self.cache_dir, "dataset.cache_dir", hint)
            presence = object_presence(directory, names, self.objects)
            save_presence(path, fingerprint, presence)
        return names, presence


# ---------------------------------------------------------------- splits


class AdeSplit(ImageSplit):
    """One ADE20K split: names and scene labels in memory, pixels and annotations on disk."""

    def __init__(self, folder: Path, split: str, names: list[str], labels: list[int], cfg: Ade20kConfig, objects):
        self.folder, self.split, self.names = folder, split, names
        self.resize, self.crop = cfg.resize, cfg.crop
        self.scene_objects: SceneObjects = objects
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self._fingerprint: str | None = None

    @property
    def geometry(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop)

    def image_path(self, index: int) -> Path:
        return self.folder / "images" / self.split / f"{self.names[index]}.jpg"

    def annotation_path(self, index: int) -> Path:
        return self.folder / "annotations" / self.split / f"{self.names[index]}.png"

    def __getitem__(self, index: int):
        return load_image(self.image_path(index), self.resize, self.crop), self.labels[index]

    def fingerprint(self) -> str:
        """sha256 of the geometry and the (name, size, label) of every image."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.resize}:{self.crop}\n".encode())
            for index, (name, label) in enumerate(zip(self.names, self.labels.tolist())):
                h.update(f"{self.split}/{name}\0{os.stat(self.image_path(index)).st_size}\0{label}\n".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def annotation(self, index: int) -> torch.Tensor:
        """uint8 [crop, crop]: the object labels of image ``index`` at the evaluation geometry."""
        labels = read_annotation(self.annotation_path(index), self.scene_objects.objects)
        return fit_annotation(labels, self.resize, self.crop)

    def pair_evidence(self, index: int, a: int, b: int) -> torch.Tensor:
        """bool [crop, crop]: the pixels of the objects typical of both scene ``a`` and scene ``b``."""
        shared = self.scene_objects.shared(a, b)
        if not shared.any():
            return torch.zeros(self.crop, self.crop, dtype=torch.bool)
        return torch.from_numpy(shared)[self.annotation(index).long()]


# ---------------------------------------------------------------- building


def build_ade20k(cfg: Ade20kConfig) -> Dataset:
    folder = dataset_folder(Path(cfg.root), INNER, "sceneCategories.txt", LAYOUT)
    if not (folder / "objectInfo150.txt").is_file():
        raise RoarError(f"ADE20K file missing: {folder / 'objectInfo150.txt'}; expected {LAYOUT}")
    objects = read_objects(folder)
    scenes = read_scenes(folder)
    found = {split: image_names(folder, split) for split in SPLITS}
    check_listed(folder, scenes, found)
    counts: dict[str, int] = {}
    for name in found["training"]:
        counts[scenes[name]] = counts.get(scenes[name], 0) + 1
    classes = choose_scenes(counts, cfg)
    index = {scene: k for k, scene in enumerate(classes)}
    kept = {split: [n for n in names if scenes[n] in index] for split, names in found.items()}
    if not kept["validation"]:
        raise RoarError(f"{folder / 'images' / 'validation'} has no image of the {len(classes)} chosen scenes")
    train_labels = [index[scenes[n]] for n in kept["training"]]
    shared = SceneObjects(folder, len(objects), len(classes), (kept["training"], train_labels), cfg)
    train = AdeSplit(folder, "training", kept["training"], train_labels, cfg, shared)
    test_labels = [index[scenes[n]] for n in kept["validation"]]
    test = AdeSplit(folder, "validation", kept["validation"], test_labels, cfg, shared)
    info = {
        "root": str(cfg.root),
        "resize": cfg.resize,
        "crop": cfg.crop,
        "scenes": len(classes),
        "objects": len(objects),
        "object_share": cfg.object_share,
    }
    return Dataset(cfg.name, train, test, classes, tuple(cfg.mean), tuple(cfg.std), info=info)


DATASETS.register("ade20k", Ade20kConfig)(build_ade20k)
