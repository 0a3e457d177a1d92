"""The maps section: what each method's map looks like on fixed test images, and what ROAR and ROAD
do to the image when its top pixels go.

Per chosen image (the first ``report.images_per_class`` test images of each of the first
``report.classes`` classes: fixed, so reports of two runs show the same images), one picture: the
image, then a column per method with its map (normalised to its maximum), the image with the map's
top ``report.fraction`` of pixels removed by the ROAR fill of this run (``retrain.fill``; the ROAR
paper's per-channel mean when that fill is ROAD itself) and removed by ROAD's imputation. The
removal uses the same seeded ranking and exact pixel count as ROAR and the curves
(``roar.perturb.ranking``).
"""

from __future__ import annotations

import numpy as np
import torch

from roar.config import RunConfig
from roar.core.errors import RoarError
from roar.core.plots import pyplot
from roar.perturb.fills import ablate, build_fill
from roar.perturb.ranking import count, ranks, select
from roar.stages.report import figures
from roar.stages.report.document import Section, Text, not_run

SCALE = 3  # each pixel drawn as SCALE × SCALE screen pixels: 32 × 32 images become 96 × 96 tiles
GAP = 4


def chosen_rows(labels: torch.Tensor, classes: int, per_class: int) -> list[int]:
    """The first ``per_class`` rows of each of the first ``classes`` classes present, class by class."""
    rows = []
    for c in sorted(set(labels.tolist()))[:classes]:
        rows += (labels == c).nonzero().flatten()[:per_class].tolist()
    return rows


def _tile(x: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1] → uint8, enlarged SCALE times (nearest neighbour: pixels stay pixels)."""
    x = np.clip(x, 0, 1).repeat(SCALE, 0).repeat(SCALE, 1)
    return (255 * x + 0.5).astype(np.uint8)


def _heat(m: np.ndarray) -> np.ndarray:
    """A map [H, W] as colours, divided by its maximum (a zero map stays dark)."""
    top = float(np.abs(m).max())
    from matplotlib import colormaps

    return colormaps["inferno"](m / top if top > 0 else m)[..., :3]


def maps_section(cfg: RunConfig, command: str, dataset) -> Section:
    from roar.stages.extract import store_path

    title = "Maps"
    if not store_path(cfg, "test").exists():
        return not_run(title, command.format(stage="extract"))
    if isinstance(dataset, str):
        return not_run(title, command.format(stage="extract"), f"the dataset cannot be read ({dataset})")
    rc = cfg.report
    split = dataset.split("test")
    try:
        methods, rows, maps = _stored(cfg, dataset, split)
    except RoarError as exc:  # maps of another model or data: the section says so, the report goes on
        return not_run(title, command.format(stage="extract"), str(exc))
    if not methods:
        return not_run(title, command.format(stage="extract"), f"none of {rc.methods} is in the store")
    index = torch.tensor(rows)
    images = split.read(index).float().div_(255)
    roar_fill = cfg.retrain.fill if cfg.retrain.fill.name != "road" else None
    fills = [
        (
            f"ROAR {cfg.retrain.fill.name}" if roar_fill else "mean (ROAR paper)",
            build_fill(roar_fill or "mean", mean=dataset.mean),
        ),
        ("ROAD", build_fill("road", mean=dataset.mean)),
    ]
    h, w = images.shape[-2:]
    k = count(rc.fraction, h * w)
    generator = torch.Generator().manual_seed(cfg.seed)
    removed = {m: select(ranks(maps[m], index, cfg.seed), k, h * w, "roar") for m in methods}
    ablated = {
        (m, name): ablate(images, removed[m].expand_as(images), fill, indices=index, generator=generator)
        for m in methods
        for name, fill in fills
    }
    blocks: list = [
        Text(
            f"Each method's map (normalised to its maximum) on fixed test images, and the image with the map's top "
            f"{100 * rc.fraction:g}% pixels ({k} of {h * w}) removed, filled as ROAR fills them in this run and "
            "by ROAD's imputation. A fill that leaves the object's outline visible leaks the map into the "
            "retrained model's input."
        )
    ]
    names = [name for name, _ in fills]
    for i, row in enumerate(rows):
        label = dataset.class_names[int(split.labels[row])]
        panel = _mosaic(
            images[i], [maps[m][i].numpy() for m in methods], [[ablated[(m, n)][i] for m in methods] for n in names]
        )
        picture = _labelled(panel, methods, ["map", *names], f"test image {row}: {label}")
        blocks.append(figures.png_array(f"maps_{row}", picture, f"Test image {row} ({label})."))
    return Section(title, blocks)


def _stored(cfg: RunConfig, dataset, split) -> tuple[list[str], list[int], dict[str, torch.Tensor]]:
    """(methods, chosen rows, {method: maps [n, H, W]}) from the run's test store."""
    from roar.stages.extract import open_maps

    rc = cfg.report
    with open_maps(cfg, dataset, "test") as store:
        if store.channels:
            raise RoarError("the store keeps maps per channel; the maps section shows maps reduced over channels")
        methods = [m for m in (rc.methods or store.methods) if m in store.methods]
        rows = chosen_rows(split.labels, rc.classes, rc.images_per_class)
        ascending = np.array(sorted(rows))  # the store reads rows in order
        back = np.searchsorted(ascending, rows)
        maps = {m: torch.as_tensor(np.asarray(store.read_rows(m, ascending), dtype=np.float32)[back]) for m in methods}
    return methods, rows, maps


def _mosaic(image: torch.Tensor, maps: list[np.ndarray], rows: list[list[torch.Tensor]]) -> np.ndarray:
    """uint8 [rows·tile, (1 + methods)·tile, 3]: the image in the first column, then a column per method."""
    tile = _tile(image.permute(1, 2, 0).numpy())
    th, tw = tile.shape[:2]
    n_rows, n_cols = 1 + len(rows), 1 + len(maps)
    canvas = np.full((n_rows * (th + GAP) - GAP, n_cols * (tw + GAP) - GAP, 3), 255, np.uint8)

    def put(r, c, pixels):
        canvas[r * (th + GAP) : r * (th + GAP) + th, c * (tw + GAP) : c * (tw + GAP) + tw] = pixels

    put(0, 0, tile)
    for c, m in enumerate(maps, start=1):
        put(0, c, _tile(_heat(m)))
    for r, ablations in enumerate(rows, start=1):
        for c, x in enumerate(ablations, start=1):
            put(r, c, _tile(x.permute(1, 2, 0).numpy()))
    return canvas


def _labelled(panel: np.ndarray, methods: list[str], row_names: list[str], title: str) -> np.ndarray:
    """The mosaic with the method names above its columns and the row names at its left, as pixels."""
    plt = pyplot()
    dpi = 100
    height, width = panel.shape[:2]
    top, left, right = 90, 170, 110  # room for the rotated method names and the row names
    total = width + left + right
    fig = plt.figure(figsize=(total / dpi, (height + top) / dpi), dpi=dpi)
    ax = fig.add_axes((left / total, 0, width / total, height / (height + top)))
    ax.imshow(panel, interpolation="nearest")
    ax.set_axis_off()
    tile = (width + GAP) / (1 + len(methods))
    for c, name in enumerate(["image", *methods]):
        ax.text((c + 0.5) * tile - GAP / 2, -8, name, ha="left", va="bottom", rotation=30, fontsize=10)
    row = (height + GAP) / len(row_names)
    for r, name in enumerate(row_names):
        ax.text(-8, (r + 0.5) * row - GAP / 2, name, ha="right", va="center", fontsize=10)
    fig.text(0.005, 1 - 0.2 * top / (height + top), title, fontsize=11, ha="left", va="top", weight="bold")
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return pixels
