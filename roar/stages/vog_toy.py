"""``roar vog-toy``: VoG on 2-D blobs, where the difficulty of a point is visible as its distance
to the decision boundary (the toy experiment of Agarwal, D'souza and Hooker, CVPR 2022).

Setting (as in the VoG code's ``toy_script.py``): ``make_blobs`` with 500 points, 2 features,
cluster_std 2 and 3 centres; blob 0 is class 0, blobs 1 and 2 are class 1; 450 train and 50 test
points (a seeded split). A small MLP is trained full batch with SGD, one step per epoch, and after
every epoch the model (in eval mode) gives a snapshot: the gradient of the *post-softmax*
probability of the true class with respect to the input point. VoG is computed by
``roar.vog.scores.vog_scores`` from the snapshots of the chosen stage only (the original script
averaged over every epoch whatever the stage), then optionally class-normalised.

The claim under test: points close to the boundary have high VoG. The original drew VoG against
the distance to a hard-coded line; here the distance is to the trained model's own boundary
(``boundary_distance``), and the agreement is one number, Spearman's ρ (negative when the claim
holds). With the defaults (seed 0, 100 epochs) the whole run takes a few seconds on one CPU core.

Outputs in ``out``: ``boundary.png``, ``vog_vs_distance.png``, ``scores.csv``, ``summary.json`` and
``provenance.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from roar.attribution.engine import input_gradients as engine_input_gradients
from roar.core.device import one_cpu_thread
from roar.core.errors import RoarError
from roar.core.locks import output_folder
from roar.core.plots import pyplot, save_figure
from roar.core.provenance import run_info, write_json
from roar.core.tables import write_csv
from roar.models.base import Classifier
from roar.models.mlp import MLP
from roar.stages.result import StageResult
from roar.vog import analysis as A
from roar.vog.scores import VARIANTS, default_stages, vog_scores, vog_variants

# ---------------------------------------------------------------------------------------- settings

N_SAMPLES = 500  # points drawn by make_blobs
N_TRAIN = 450  # the remaining 50 are the test split
CLUSTER_STD = 2.0  # standard deviation of each blob, in data units
CENTERS = 3  # blob 0 -> class 0, blobs 1 and 2 -> class 1
HIDDEN = (16, 16)  # widths of the MLP's tanh layers (tanh: a smooth boundary, well-defined distances)
LR = 0.3  # SGD learning rate; one full-batch step per epoch
EPOCHS = 100  # snapshots: one per epoch, so each of early / middle / late holds about a third
RESOLUTION = 500  # grid points per axis when locating the boundary (cell ~0.06 data units)
MARGIN = 1.0  # the grid extends this far (data units) beyond the points on every side

SPLITS = ("train", "test")
STAGES = ("early", "middle", "late", "complete")
CALIBRATIONS = ("raw", "normalize", "abs_normalize")
COLUMNS = ["index", "split", "x0", "x1", "label", "prediction", "correct", "distance", *VARIANTS]


# -------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ToyData:
    """The 500 blob points: coordinates [500, 2], class labels, blob ids and sorted split indices."""

    x: np.ndarray
    labels: np.ndarray
    blobs: np.ndarray
    train: np.ndarray
    test: np.ndarray

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.test


def make_toy_data(seed: int) -> ToyData:
    """Blobs drawn with ``random_state=seed``; a seeded permutation picks the 450 train points."""
    from sklearn.datasets import make_blobs

    x, blobs = make_blobs(
        n_samples=N_SAMPLES, n_features=2, cluster_std=CLUSTER_STD, centers=CENTERS, random_state=seed
    )
    labels = (blobs != 0).astype(np.int64)
    order = np.random.default_rng(seed).permutation(N_SAMPLES)
    return ToyData(x, labels, blobs, np.sort(order[:N_TRAIN]), np.sort(order[N_TRAIN:]))


# ------------------------------------------------------------------------------------------- model


def toy_model(mean: torch.Tensor, std: torch.Tensor, hidden: tuple[int, ...] = HIDDEN) -> Classifier:
    """The registry's MLP, 2 → 16 → 16 → 2 with tanh, behind a standardisation from the train split
    (fixed, inside the model), so that gradients and the boundary live in data coordinates."""
    return Classifier(MLP(2, 2, hidden, "tanh"), tuple(mean.tolist()), tuple(std.tolist()))


def input_gradients(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """∂ softmax(f(x))_y / ∂x for every point, model in eval mode: [N, 2]. The toy differentiates
    the probability, not the logit: far from the boundary it saturates and its gradient vanishes."""
    return engine_input_gradients(model, x, labels, output=lambda logits: logits.softmax(dim=1)).numpy()


def train_toy(data: ToyData, split: str, epochs: int, seed: int, lr: float = LR) -> tuple[Classifier, np.ndarray]:
    """Train on the train split with full-batch SGD; after each epoch snapshot the input gradients
    of the ``split`` points. Returns the trained model and the snapshots [epochs, N, 2].

    Runs on the CPU in float64, single-threaded: 500 two-dimensional points are far too few for
    a GPU or a second thread to help, and one device and precision everywhere make a rerun with
    the same seed write the same scores. The weights are drawn after ``torch.manual_seed(seed)``
    inside ``fork_rng``, so the caller's global RNG state is restored afterwards.
    """
    with one_cpu_thread():
        return _train(data, split, epochs, seed, lr)


def _train(data: ToyData, split: str, epochs: int, seed: int, lr: float) -> tuple[Classifier, np.ndarray]:
    x = torch.tensor(data.x, dtype=torch.float64)
    y = torch.tensor(data.labels)
    train_x, train_y = x[data.train], y[data.train]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = toy_model(train_x.mean(dim=0), train_x.std(dim=0)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    idx = data.split(split)
    snapshots = []
    for _ in range(epochs):
        model.train()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train_x), train_y).backward()
        optimizer.step()
        snapshots.append(input_gradients(model, x[idx], y[idx]))
    model.eval()
    return model, np.stack(snapshots)


def logit_margin(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """A callable [M, 2] → [M]: logit of class 1 minus logit of class 0; its zero set is the boundary."""

    def score(points: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = model(torch.as_tensor(points, dtype=torch.float64))
        return (z[:, 1] - z[:, 0]).numpy()

    return score


# --------------------------------------------------------------------------------------------- VoG


def stage_snapshots(k: int, stage: str) -> list[int]:
    """Positions (0-based) of the ``stage``'s snapshots among K: ``default_stages(K)``."""
    stages = default_stages(k)
    if stage not in stages:
        raise RoarError(f"stage '{stage}' needs at least 3 epochs (got {k}); use more epochs or --stage complete")
    return stages[stage]


def toy_vog(gradients: np.ndarray, labels: np.ndarray, stage: str) -> tuple[dict[str, np.ndarray], list[int]]:
    """VoG of [K, N, 2] snapshots over the ``stage``'s snapshots only (``default_stages(K)``):
    {raw, class-normalised, |class-normalised|} keyed by ``scores.VARIANTS``, and the positions used."""
    positions = stage_snapshots(len(gradients), stage)
    return vog_variants(vog_scores(gradients, positions), labels), positions


# ---------------------------------------------------------------------------------------- boundary


def _grid(model_fn: Callable[[np.ndarray], np.ndarray], bounds, resolution: int):
    (x0_lo, x0_hi), (x1_lo, x1_hi) = bounds
    g0 = np.linspace(x0_lo, x0_hi, resolution)
    g1 = np.linspace(x1_lo, x1_hi, resolution)
    mesh0, mesh1 = np.meshgrid(g0, g1)  # [row = x1, column = x0]
    values = np.asarray(model_fn(np.column_stack([mesh0.ravel(), mesh1.ravel()])), dtype=np.float64)
    return g0, g1, values.reshape(resolution, resolution)


def _boundary_segments(g0: np.ndarray, g1: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The zero level set of ``values`` as line segments [S, 2 ends, 2 coordinates] in data space."""
    from skimage.measure import find_contours

    step0, step1 = g0[1] - g0[0], g1[1] - g1[0]
    segments = []
    for contour in find_contours(values, 0.0):  # (row, column) in grid-index units
        points = np.column_stack([g0[0] + contour[:, 1] * step0, g1[0] + contour[:, 0] * step1])
        if len(points) == 1:
            points = np.repeat(points, 2, axis=0)
        segments.append(np.stack([points[:-1], points[1:]], axis=1))
    return np.concatenate(segments) if segments else np.empty((0, 2, 2))


def _distance_to_segments(points: np.ndarray, segments: np.ndarray, block: int = 256) -> np.ndarray:
    """Exact Euclidean distance of each point to the nearest segment (blocks of points bound memory)."""
    a, b = segments[:, 0], segments[:, 1]
    ab = b - a
    length2 = np.maximum((ab**2).sum(axis=1), np.finfo(np.float64).tiny)
    out = np.empty(len(points))
    for i in range(0, len(points), block):
        p = points[i : i + block, None, :]  # [B, 1, 2]
        t = np.clip(((p - a) * ab).sum(axis=2) / length2, 0.0, 1.0)  # [B, S]
        nearest = a + t[..., None] * ab
        out[i : i + block] = np.sqrt(((p - nearest) ** 2).sum(axis=2)).min(axis=1)
    return out


def boundary_distance(
    model_fn: Callable[[np.ndarray], np.ndarray],
    points: np.ndarray,
    bounds: tuple[tuple[float, float], tuple[float, float]],
    resolution: int = RESOLUTION,
) -> np.ndarray:
    """Euclidean distance of each point [M, 2] to the decision boundary {x : model_fn(x) = 0}.

    ``model_fn`` maps [M, 2] coordinates to one score each (e.g. a logit difference). It is
    evaluated on a ``resolution`` × ``resolution`` grid over ``bounds`` = ((x0_min, x0_max),
    (x1_min, x1_max)); the zero level set is traced with ``skimage.measure.find_contours``
    (linear interpolation along grid edges, so a straight boundary is recovered exactly and a
    curved one to O(cell² · curvature)), and each point gets its exact distance to the nearest
    segment of that polyline. Only the boundary inside ``bounds`` counts, so the bounds should
    cover the points with a margin. No boundary inside ``bounds``: every distance is ``inf``.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if resolution < 2:
        raise ValueError("resolution must be at least 2 grid points per axis")
    segments = _boundary_segments(*_grid(model_fn, bounds, resolution))
    if not len(segments):
        return np.full(len(points), np.inf)
    return _distance_to_segments(points, segments)


def data_bounds(x: np.ndarray, margin: float = MARGIN) -> tuple[tuple[float, float], tuple[float, float]]:
    lo, hi = x.min(axis=0) - margin, x.max(axis=0) + margin
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


# ----------------------------------------------------------------------------------------- figures

CLASS_COLOURS = ("tab:blue", "tab:orange")


def plot_boundary(
    data: ToyData,
    model_fn: Callable[[np.ndarray], np.ndarray],
    bounds,
    split: str,
    vog: np.ndarray,
    vog_label: str,
    stage_text: str,
    path: Path,
) -> None:
    """Left: decision regions and boundary with every point (colour: class; ○ train, △ test).
    Right: the analysed split's points coloured by their VoG (marker: class)."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    g0, g1, values = _grid(model_fn, bounds, 300)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax in axes:
        ax.contourf(g0, g1, values > 0, levels=[-0.5, 0.5, 1.5], colors=CLASS_COLOURS, alpha=0.15)
        ax.contour(g0, g1, values, levels=[0.0], colors="black", linewidths=1.5)
        ax.set_xlim(bounds[0])
        ax.set_ylim(bounds[1])
        ax.set_aspect("equal")
        ax.set_xlabel("x0")
        ax.set_ylabel("x1")
    left = axes[0]
    for name, marker, size in (("train", "o", 14), ("test", "^", 40)):
        idx = data.split(name)
        for c in (0, 1):
            sel = idx[data.labels[idx] == c]
            left.scatter(
                *data.x[sel].T, s=size, marker=marker, c=CLASS_COLOURS[c], edgecolors="black", linewidths=0.4,
                label=f"class {c}, {name}",
            )  # fmt: skip
    left.legend(fontsize=8, loc="best", framealpha=0.8)
    left.set_title("Decision regions and boundary of the trained MLP", fontsize=10)
    right = axes[1]
    idx = data.split(split)
    scatter = None
    for c, marker in ((0, "o"), (1, "s")):
        sel = data.labels[idx] == c
        scatter = right.scatter(
            *data.x[idx[sel]].T, c=vog[sel], cmap="viridis", vmin=vog.min(), vmax=vog.max(), marker=marker,
            s=22 if split == "train" else 45, edgecolors="black", linewidths=0.3, label=f"class {c}",
        )  # fmt: skip
    fig.colorbar(scatter, ax=right, label=vog_label)
    handles = [
        Line2D([], [], marker=m, linestyle="", color="lightgray", markeredgecolor="black", label=f"class {c}")
        for c, m in ((0, "o"), (1, "s"))
    ]
    right.legend(handles=handles, fontsize=8, loc="best", framealpha=0.8)
    right.set_title(f"{vog_label} of the {split} points ({stage_text})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_vog_vs_distance(
    distance: np.ndarray, vog: np.ndarray, labels: np.ndarray, correct: np.ndarray, vog_label: str, title: str, path
) -> None:
    """VoG against the distance to the boundary, coloured by class; misclassified points ringed in red."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for c in (0, 1):
        sel = labels == c
        ax.scatter(
            distance[sel], vog[sel], s=20, c=CLASS_COLOURS[c], alpha=0.75, edgecolors="black", linewidths=0.3,
            label=f"class {c}",
        )  # fmt: skip
    wrong = ~correct
    if wrong.any():
        ax.scatter(
            distance[wrong], vog[wrong], s=70, facecolors="none", edgecolors="red", linewidths=1.0,
            label="misclassified",
        )  # fmt: skip
    ax.set_xlabel("distance to the trained model's decision boundary")
    ax.set_ylabel(vog_label)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------- run


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def run_toy(
    split: str = "train",
    stage: str = "complete",
    vog_cal: str = "raw",
    seed: int = 0,
    epochs: int = EPOCHS,
    out: str | Path = "runs/vog_toy",
    lr: float = LR,
    resolution: int = RESOLUTION,
) -> StageResult:
    """The toy experiment end to end; writes the figures, ``scores.csv`` and ``summary.json`` into
    ``out`` and returns the summary. ``split`` is the split whose points are scored (the model is
    always trained on the train split); ``stage`` picks the snapshots; ``vog_cal`` the variant
    that the correlation and figures use (``scores.csv`` holds all three). ``out`` is locked while
    it is written (``roar.core.locks.output_folder``): a second writer, or a file in its place, is
    a RoarError before any work."""
    t0 = time.perf_counter()
    for name, value, allowed in (
        ("split", split, SPLITS),
        ("stage", stage, STAGES),
        ("vog_cal", vog_cal, CALIBRATIONS),
    ):
        if value not in allowed:
            raise RoarError(f"{name} must be one of {', '.join(allowed)}, not '{value}'")
    if epochs < 1:
        raise RoarError(f"epochs must be at least 1, not {epochs}")
    stage_snapshots(epochs, stage)  # fail before training, not after
    with output_folder(out) as folder:  # a file in the way, or another writer, is refused here
        return _run_toy(split, stage, vog_cal, seed, epochs, folder, lr, resolution, t0)


def _run_toy(
    split: str, stage: str, vog_cal: str, seed: int, epochs: int, out: Path, lr: float, resolution: int, t0: float
) -> StageResult:
    """``run_toy`` once its arguments are checked and ``out`` is locked."""
    data = make_toy_data(seed)
    model, gradients = train_toy(data, split, epochs, seed, lr)
    idx = data.split(split)
    labels = data.labels[idx]
    variants, positions = toy_vog(gradients, labels, stage)
    chosen = VARIANTS[CALIBRATIONS.index(vog_cal)]
    vog = variants[chosen]

    score_fn = logit_margin(model)
    bounds = data_bounds(data.x)
    distance = boundary_distance(score_fn, data.x[idx], bounds, resolution)
    predictions = (score_fn(data.x) > 0).astype(np.int64)
    correct = predictions == data.labels
    rho, p = A.spearman(vog, distance)

    rows = [
        {
            "index": int(i),
            "split": split,
            "x0": float(data.x[i, 0]),
            "x1": float(data.x[i, 1]),
            "label": int(data.labels[i]),
            "prediction": int(predictions[i]),
            "correct": int(correct[i]),
            "distance": float(distance[j]),
            **{v: float(variants[v][j]) for v in VARIANTS},
        }
        for j, i in enumerate(idx)
    ]
    write_csv(out / "scores.csv", rows, COLUMNS)

    vog_label = {"raw": "VoG", "normalize": "class-normalised VoG", "abs_normalize": "|class-normalised VoG|"}[vog_cal]
    first, last = positions[0] + 1, positions[-1] + 1
    stage_text = f"{stage} stage, epochs {first}–{last}"
    plot_boundary(data, score_fn, bounds, split, vog, vog_label, stage_text, out / "boundary.png")
    rho_text = "undefined (no boundary inside the plot)" if math.isnan(rho) else f"{rho:.3f} (p = {p:.2g})"
    title = f"Spearman ρ = {rho_text}\n{len(idx)} {split} points, {stage_text}, {vog_label}"
    plot_vog_vs_distance(distance, vog, labels, correct[idx], vog_label, title, out / "vog_vs_distance.png")

    summary = {
        "seed": seed,
        "split": split,
        "points": len(idx),
        "stage": stage,
        "vog_cal": vog_cal,
        "epochs": epochs,
        "snapshots_used": len(positions),
        "snapshot_epochs": [first, last],
        "spearman_rho": _finite_or_none(rho),
        "p_value": _finite_or_none(p),
        "train_accuracy": float(correct[data.train].mean()),
        "test_accuracy": float(correct[data.test].mean()),
        "model": f"MLP 2-{'-'.join(map(str, HIDDEN))}-2, tanh, full-batch SGD lr {lr}",
        "gradient": "d softmax(f(x))_y / dx, true class y, eval mode, after every epoch",
        "boundary_grid": {"bounds": bounds, "resolution": resolution},
        "seconds": round(time.perf_counter() - t0, 2),
        "output": str(out),
    }
    write_json(out / "summary.json", summary)
    write_json(out / "provenance.json", run_info(seed, {}, torch.device("cpu")))
    s = summary
    rho = (
        "undefined (no decision boundary in the plotted area)"
        if s["spearman_rho"] is None
        else f"{s['spearman_rho']:.3f}"
    )
    line = (
        f"VoG toy ({s['split']} split, {s['stage']} stage, {s['vog_cal']}): Spearman rho = {rho} between VoG and "
        f"distance to the boundary over {s['points']} points (accuracy train {100 * s['train_accuracy']:.1f}%, "
        f"test {100 * s['test_accuracy']:.1f}%) in {s['seconds']:.1f} s; figures, scores and summary -> {s['output']}"
    )
    return StageResult(s, line)
