"""``shapes``: the built-in procedural dataset with ground-truth object masks.

Each 32×32 RGB image shows one object whose *shape* is the class (disk, ring, square, ...) at a
random position, scale, rotation and colour, on a textured background with small distractors.
Colour, position and texture are independent of the class, so a linear model on raw pixels does
poorly while a small CNN learns it in a few CPU minutes. Because the generator knows where the
object is, every image carries an exact object mask: an oracle attribution map, and the ground
truth for localisation metrics.

A controlled fraction of examples is made hard on purpose and tagged: ``low_contrast`` (object
colour close to the background), ``occluded`` (part of the object covered by background) and
``two_objects`` (a second object of another class, mask value 2: the image is ambiguous).
Difficulty scores and insecurity maps have something real to find there.

Generation is deterministic in ``seed`` and sizes; the result is cached under ``root``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from tqdm import tqdm

from roar.core.atomic import replace_atomic
from roar.core.errors import RoarError
from roar.core.schema import Seed
from roar.data.base import TAGS, Dataset, DatasetConfig, TensorSplit, channel_stats, writable_folder
from roar.data.registry import DATASETS

CLASS_NAMES = ["disk", "ring", "square", "frame", "triangle", "diamond", "plus", "cross", "star", "crescent"]
SUPERSAMPLE = 4  # render at 4× and average: anti-aliased edges, sub-pixel masks
GENERATOR_VERSION = 2  # bump when the images a seed produces change: invalidates caches


class ShapesConfig(DatasetConfig):
    name: Literal["shapes"] = "shapes"
    train_size: int = Field(10000, ge=10)
    test_size: int = Field(2000, ge=10)
    image_size: int = Field(32, ge=16, le=256)
    seed: Seed = Field(0, description="seed of the generated images (train and test get streams of their own)")
    hard_fraction: float = Field(
        0.12, ge=0.0, le=1.0, description="share of hard examples, split evenly over the hard tags"
    )
    distractors: int = Field(3, ge=0, le=20, description="maximum number of small distractors per image")
    cache: bool = True


# ---------------------------------------------------------------- shapes in the object frame
# Each takes coordinates (u, v) in the object's frame, where the object spans about [-1, 1],
# and returns whether each point is inside.


def _inside(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    a, b = np.abs(u), np.abs(v)
    name = CLASS_NAMES[cls]
    if name == "disk":
        return r <= 0.9
    if name == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if name == "square":
        return np.maximum(a, b) <= 0.75
    if name == "frame":
        return (np.maximum(a, b) <= 0.85) & (np.maximum(a, b) >= 0.45)
    if name == "triangle":  # pointing up (v grows downwards in image coordinates)
        return (v <= 0.7) & (v >= 2.0 * a - 1.0)
    if name == "diamond":
        return a + b <= 1.0
    if name == "plus":
        return ((a <= 0.28) & (b <= 1.0)) | ((b <= 0.28) & (a <= 1.0))
    if name == "cross":
        p, q = np.abs(u + v) / np.sqrt(2), np.abs(u - v) / np.sqrt(2)
        return ((p <= 0.24) & (q <= 0.95)) | ((q <= 0.24) & (p <= 0.95))
    if name == "star":
        theta = np.arctan2(v, u) + np.pi / 2
        spike = 0.5 + 0.5 * np.cos(5 * theta)
        return r <= 0.42 + 0.58 * spike**2
    if name == "crescent":
        return (r <= 0.95) & (np.hypot(u - 0.45, v) >= 0.7)
    raise ValueError(name)


# ---------------------------------------------------------------- image parts


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth coloured noise plus stripes: texture the model must learn to ignore."""
    base = rng.uniform(0.15, 0.85, size=3)
    coarse = rng.normal(0.0, 0.12, size=(3, 5, 5))
    # bilinear upsampling of the coarse grid, via separable interpolation
    grid = np.linspace(0, 4, size)
    lo = np.floor(grid).astype(int).clip(0, 3)
    w = grid - lo
    rows = coarse[:, lo, :] * (1 - w)[None, :, None] + coarse[:, lo + 1, :] * w[None, :, None]
    smooth = rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, lo + 1] * w[None, None, :]
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 6)
    stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6.3))
    stripe_colour = rng.normal(0.0, 0.06, size=3)
    img = base[:, None, None] + smooth + stripe_colour[:, None, None] * stripes[None]
    img += rng.normal(0.0, 0.02, size=img.shape)
    return img


def _supersampled(size: int, cx: float, cy: float, reach: float):
    """Sub-pixel coordinates of the pixel window that can hold a shape of extent ``reach``.

    Only the window around the shape is supersampled: this keeps generation at well under a
    millisecond per image.
    """
    x0, x1 = max(0, int(cx - reach)), min(size, int(np.ceil(cx + reach)) + 1)
    y0, y1 = max(0, int(cy - reach)), min(size, int(np.ceil(cy + reach)) + 1)
    ys = y0 + (np.arange((y1 - y0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = x0 + (np.arange((x1 - x0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    y, x = np.meshgrid(ys, xs, indexing="ij")
    return x, y, (slice(y0, y1), slice(x0, x1))


def _pool(hit: np.ndarray, window: tuple[slice, slice], size: int) -> np.ndarray:
    """Average the supersampled hits of a window into per-pixel coverage of the whole image."""
    out = np.zeros((size, size), np.float32)
    h, w = hit.shape[0] // SUPERSAMPLE, hit.shape[1] // SUPERSAMPLE
    out[window] = hit.astype(np.float32).reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
    return out


def _coverage(cls: int, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the object, from a supersampled render."""
    x, y, window = _supersampled(size, cx, cy, 1.5 * radius)
    dx, dy = (x - cx) / radius, (y - cy) / radius
    c, si = np.cos(angle), np.sin(angle)
    u, v = c * dx + si * dy, -si * dx + c * dy
    return _pool(_inside(cls, u, v), window, size)


def _distractor(rng: np.random.Generator, size: int) -> np.ndarray:
    """A short line or a small dot: clutter that is no class."""
    cx, cy = rng.uniform(0, size, size=2)
    x, y, window = _supersampled(size, cx, cy, 5.0)
    if rng.random() < 0.5:
        hit = np.hypot(x - cx, y - cy) <= rng.uniform(0.8, 1.8)
    else:
        length, angle = rng.uniform(3, 8), rng.uniform(0, np.pi)
        d = np.array([np.cos(angle), np.sin(angle)])
        t = np.clip((x - cx) * d[0] + (y - cy) * d[1], -length / 2, length / 2)
        hit = np.hypot(x - cx - t * d[0], y - cy - t * d[1]) <= rng.uniform(0.5, 0.9)
    return _pool(hit, window, size)


def _colour_against(rng: np.random.Generator, background: np.ndarray, low_contrast: bool) -> np.ndarray:
    """An object colour far from (or, for hard examples, close to) the local background."""
    bg = background.reshape(3, -1).mean(axis=1)
    lo, hi = (0.08, 0.16) if low_contrast else (0.35, 2.0)
    for _ in range(100):
        colour = bg + rng.normal(0, 0.1, size=3) if low_contrast else rng.uniform(0, 1, size=3)
        distance = np.abs(colour - bg).sum()
        if lo <= distance <= hi and np.all((colour >= 0) & (colour <= 1)):
            return colour
    return np.clip(bg + (0.12 if low_contrast else 0.5) * np.sign(0.5 - bg), 0, 1)


def _place(rng: np.random.Generator, size: int, radius: float, avoid: tuple[float, float, float] | None):
    """A centre that keeps the object inside the image and, if asked, apart from another."""
    for _ in range(200):
        cx, cy = rng.uniform(radius, size - radius, size=2)
        if avoid is None or np.hypot(cx - avoid[0], cy - avoid[1]) >= 0.9 * (radius + avoid[2]):
            return cx, cy
    return cx, cy


def render(rng: np.random.Generator, label: int, tag: str, size: int, distractors: int):
    """One example: float image [3, H, W] in [0, 1], mask [H, W] uint8, other label or -1."""
    img = _background(rng, size)
    for _ in range(rng.integers(0, distractors + 1)):
        alpha = _distractor(rng, size)
        img = img * (1 - alpha) + rng.uniform(0, 1, size=3)[:, None, None] * alpha

    two = tag == "two_objects"
    radius = rng.uniform(0.19, 0.3) * size if two else rng.uniform(0.22, 0.36) * size
    cx, cy = _place(rng, size, radius, None)
    background = img.copy()
    objects = [(label, cx, cy, radius)]
    other = -1
    if two:
        other = int((label + rng.integers(1, len(CLASS_NAMES))) % len(CLASS_NAMES))
        ox, oy = _place(rng, size, radius, (cx, cy, radius))
        objects.append((other, ox, oy, radius))

    mask = np.zeros((size, size), np.uint8)
    for value, (cls, x, y, r) in enumerate(objects, start=1):
        alpha = _coverage(cls, x, y, r, rng.uniform(-0.3, 0.3), size)
        colour = _colour_against(rng, background, tag == "low_contrast")
        img = img * (1 - alpha) + colour[:, None, None] * alpha
        mask[alpha >= 0.5] = value  # a later object covers an earlier one

    if tag == "occluded":  # background texture pasted over 30-50% of the object's extent
        ys, xs = np.nonzero(mask == 1)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        share = rng.uniform(0.3, 0.5)
        if rng.random() < 0.5:
            cut = int(round((y1 - y0) * share))
            rows = slice(y0, y0 + cut) if rng.random() < 0.5 else slice(y1 - cut, y1)
            cols = slice(x0, x1)
        else:
            cut = int(round((x1 - x0) * share))
            cols = slice(x0, x0 + cut) if rng.random() < 0.5 else slice(x1 - cut, x1)
            rows = slice(y0, y1)
        img[:, rows, cols] = background[:, rows, cols]
        mask[rows, cols] = 0
    return np.clip(img, 0, 1), mask, other


def generate(n: int, seed: int, size: int, hard_fraction: float, distractors: int, desc: str = "shapes"):
    """``n`` examples with balanced classes; tags and labels are drawn from ``seed`` first."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES))
    n_hard = int(round(n * hard_fraction))
    tags = np.zeros(n, np.int64)
    tags[rng.permutation(n)[:n_hard]] = 1 + np.arange(n_hard) % (len(TAGS) - 1)
    images = np.empty((n, 3, size, size), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    others = np.full(n, -1, np.int64)
    # One child stream per example: example i is the same whatever n is.
    children = np.random.SeedSequence([seed, 1]).spawn(n)
    for i in tqdm(range(n), desc=desc, leave=False, mininterval=1.0, disable=True if n < 2000 else None):
        img, masks[i], others[i] = render(
            np.random.default_rng(children[i]), int(labels[i]), TAGS[tags[i]], size, distractors
        )
        images[i] = np.round(img * 255).astype(np.uint8)
    return images, labels, masks, tags, others


def _cache_path(cfg: ShapesConfig, split: str, n: int, seed: int) -> Path:
    key = json.dumps([GENERATOR_VERSION, n, seed, cfg.image_size, cfg.hard_fraction, cfg.distractors], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.root) / "shapes" / f"{split}-{n}-{digest}.npz"


CACHE_HINT = "set dataset.root to a writable folder, or dataset.cache=false to generate the images anew every run"


def _split(cfg: ShapesConfig, split: str) -> TensorSplit:
    n = cfg.train_size if split == "train" else cfg.test_size
    seed = cfg.seed * 2 + (0 if split == "train" else 1)  # train and test never share a stream
    path = _cache_path(cfg, split, n, seed)
    arrays = None
    if cfg.cache and path.exists():
        try:
            with np.load(path) as f:
                arrays = tuple(f[k] for k in ("images", "labels", "masks", "tags", "others"))
        except (OSError, ValueError, KeyError):
            arrays = None  # a damaged cache is regenerated, never trusted
    if arrays is None:
        if cfg.cache:  # before the images are generated, which takes minutes at full size
            writable_folder(path.parent, "dataset.root", CACHE_HINT)
        arrays = generate(n, seed, cfg.image_size, cfg.hard_fraction, cfg.distractors, desc=f"shapes {split}")
        if cfg.cache:
            named = dict(zip(("images", "labels", "masks", "tags", "others"), arrays))
            try:
                replace_atomic(path, lambda f: np.savez(f, **named))
            except OSError as exc:
                raise RoarError(
                    f"dataset.root: cannot write the shapes cache {path}: {exc.strerror or exc}: {CACHE_HINT}"
                ) from None
    images, labels, masks, tags, others = arrays
    return TensorSplit(images, labels, masks=masks, tags=tags, other_labels=others)


@DATASETS.register("shapes", ShapesConfig)
def build_shapes(cfg: ShapesConfig) -> Dataset:
    train, test = _split(cfg, "train"), _split(cfg, "test")
    mean, std = channel_stats(train.images)
    return Dataset("shapes", train, test, list(CLASS_NAMES), mean, std, info={"tags": list(TAGS)})
