"""Figures of the report: the stages' own plots redrawn as SVG, and the few the report adds.

A stage's plot function takes its data and a path (``roar.core.plots.save_figure`` picks the format
from the extension), so the report calls the same function with an ``.svg`` path: one plotting code
per figure, vector in the report, PNG in the stage's folder. Pictures made of pixels (maps, image
grids) stay PNG.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from roar.core.plots import pyplot, save_figure
from roar.stages.report.document import Figure

# SVG output that is the same for the same figure (no random ids, no date), so reruns are comparable.
SVG_PARAMS = {"svg.hashsalt": "roar", "svg.fonttype": "path"}


def svg(name: str, plot: Callable[..., None], *args, caption: str = "", **kwargs) -> Figure:
    """``plot(*args, path, **kwargs)``, a function saving one figure to ``path``, as an SVG figure."""
    import matplotlib

    with tempfile.TemporaryDirectory() as folder, matplotlib.rc_context(SVG_PARAMS):
        path = Path(folder) / f"{name}.svg"
        plot(*args, path, **kwargs)
        text = path.read_text()
    return Figure(name, _without_date(text), ".svg", caption)


def _without_date(text: str) -> str:
    """matplotlib writes the creation date into the SVG's metadata; a report of the same results
    should be the same file."""
    import re

    return re.sub(r"<dc:date>[^<]*</dc:date>", "", text)


def png_file(name: str, path: Path, caption: str = "") -> Figure:
    """A stage's PNG as it is (pictures of images)."""
    return Figure(name, path.read_bytes(), ".png", caption)


def png_array(name: str, pixels: np.ndarray, caption: str = "") -> Figure:
    """uint8 [H, W, 3] pixels as a PNG figure."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return Figure(name, buffer.getvalue(), ".png", caption)


def plot_training(history: list[dict], path: Path) -> None:
    """Accuracy and loss per epoch, train and test, side by side."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key, style in (("train", "-o"), ("test", "-s")):
        if any(f"{key}_accuracy" in h for h in history):
            acc.plot(epochs, [100 * h.get(f"{key}_accuracy", np.nan) for h in history], style, ms=3, label=key)
            loss.plot(epochs, [h.get(f"{key}_loss", np.nan) for h in history], style, ms=3, label=key)
    acc.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100), title="Accuracy")
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    fig.tight_layout()
    save_figure(fig, path)


def plot_matrix(labels: list[str], values: np.ndarray, title: str, path: Path) -> None:
    """A symmetric matrix in [−1, 1] (Kendall τ between measures), each cell labelled."""
    plt = pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(2.5 + 0.42 * n, 1.8 + 0.38 * n))
    image = ax.imshow(values, cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    for i in range(n):
        for j in range(n):
            if np.isfinite(values[i, j]):
                color = "white" if abs(values[i, j]) > 0.6 else "black"
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(image, ax=ax, label="Kendall τ", shrink=0.8)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
