"""Speed of ROAD's noisy linear imputation: ``road_impute`` (batched, torch) against a per-image scipy solve.

    python -m benchmarks.road [--quick] [--write docs/benchmarks.md]

Random images (3 channels) with random pixel masks removing 10 %, 50 % and 90 % of the pixels, at
32×32 and 224×224. (a) ``roar.perturb.road_impute`` with noise on, in batches on the CPU; (b) the
reference way (ROAD's own code, Quantus): one image at a time, the sparse system built with
vectorised numpy (direct neighbours 1/6, diagonal ones 1/12, renormalised at the border) and solved
by ``scipy.sparse.linalg.spsolve`` with the 3 channels as right-hand sides. Both run in the same
process on the same images and masks, alternating within each round (so that a change in machine
load hits both); the best round counts. (b) solves fewer images than (a) — its figures are images
per second, so the counts need not match — and its solutions are compared with (a)'s noise-free ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy
import scipy.sparse
import scipy.sparse.linalg
import torch

from benchmarks.report import bench_parser, bench_run, header
from roar.perturb.road import linear_impute, road_impute

SECTION = "## ROAD imputation"
FRACTIONS = (0.1, 0.5, 0.9)
CHANNELS = 3
TARGET = 20.0  # (a) ÷ (b) images/s at 32×32
TARGET_SIZE = 32


@dataclass(frozen=True)
class Cell:
    size: int
    batch: int  # images per road_impute call
    ours: int  # images per round for (a)
    scipy: dict[float, int]  # images per round for (b), by fraction


@dataclass(frozen=True)
class Settings:
    cells: tuple[Cell, ...]
    rounds: int


PRESETS = {
    "quick": Settings(
        (Cell(32, 128, 128, {0.1: 20, 0.5: 10, 0.9: 5}), Cell(224, 2, 2, {0.1: 1, 0.5: 1, 0.9: 1})), rounds=1
    ),
    "default": Settings(
        (Cell(32, 256, 2048, {0.1: 400, 0.5: 200, 0.9: 100}), Cell(224, 4, 32, {0.1: 16, 0.5: 6, 0.9: 3})), rounds=3
    ),
}

OFFSETS = [(dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


# ---------------------------------------------------------------------------------------------- reference


def scipy_impute(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """ROAD's linear imputation of one image [C, H, W] (float64) with a pixel mask [H, W], the reference way."""
    c, h, w = image.shape
    pixels = np.flatnonzero(removed)
    n = len(pixels)
    index = np.full(h * w, -1)
    index[pixels] = np.arange(n)
    y, x = np.divmod(pixels, w)
    flat = image.reshape(c, -1)
    weights, inside = [], []
    for dy, dx, weight in OFFSETS:
        yy, xx = y + dy, x + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        inside.append(ok)
        weights.append(np.where(ok, weight, 0.0))
    total = np.sum(weights, axis=0)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.ones(n)]
    rhs = np.zeros((n, c))
    for (dy, dx, _), ok, weight in zip(OFFSETS, inside, weights):
        neighbour = np.where(ok, (y + dy) * w + (x + dx), 0)
        j = np.where(ok, index[neighbour], -1)
        unknown, known = ok & (j >= 0), ok & (j < 0)
        rows.append(np.flatnonzero(unknown))
        cols.append(j[unknown])
        vals.append(-(weight / total)[unknown])
        rhs[known] += (weight / total)[known, None] * flat[:, neighbour[known]].T
    matrix = scipy.sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), (n, n))
    solution = scipy.sparse.linalg.spsolve(matrix, rhs).reshape(n, c)
    out = image.copy().reshape(c, -1)
    out[:, pixels] = solution.T
    return out.reshape(c, h, w)


# ---------------------------------------------------------------------------------------------- measure


def inputs(size: int, n: int, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, CHANNELS, size, size, generator=g)
    removed = torch.rand(n, size, size, generator=g) < fraction
    return images, removed


def time_ours(images: torch.Tensor, removed: torch.Tensor, batch: int) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for a in range(0, len(images), batch):
        road_impute(images[a : a + batch], removed[a : a + batch], noise=0.01, generator=generator)
    return time.perf_counter() - start


def time_scipy(images: np.ndarray, removed: np.ndarray) -> tuple[float, list[np.ndarray]]:
    start = time.perf_counter()
    out = [scipy_impute(img, m) for img, m in zip(images, removed)]
    return time.perf_counter() - start, out


def measure(s: Settings, log) -> list[dict]:
    results = []
    for cell in s.cells:
        for fraction in FRACTIONS:
            n_ref = cell.scipy[fraction]
            images, removed = inputs(cell.size, cell.ours, fraction)
            ref_images = images[:n_ref].double().numpy()
            ref_removed = removed[:n_ref].numpy()
            time_ours(images[: min(cell.batch, 8)], removed[: min(cell.batch, 8)], cell.batch)  # warm-up
            ours, theirs = [], []
            solutions = None
            for r in range(s.rounds):
                for side in ("ours", "scipy") if r % 2 == 0 else ("scipy", "ours"):
                    if side == "ours":
                        ours.append(time_ours(images, removed, cell.batch))
                    else:
                        seconds, solutions = time_scipy(ref_images, ref_removed)
                        theirs.append(seconds)
            clean = linear_impute(images[:n_ref], removed[:n_ref]).double().numpy()
            diff = float(max(np.abs(a - b).max() for a, b in zip(clean, solutions)))
            row = {
                "size": cell.size,
                "fraction": fraction,
                "batch": cell.batch,
                "n_ours": cell.ours,
                "n_scipy": n_ref,
                "ours": cell.ours / min(ours),
                "scipy": n_ref / min(theirs),
                "diff": diff,
            }
            log(
                f"{cell.size}×{cell.size} {fraction:.0%}: road_impute {row['ours']:.0f} images/s, "
                f"scipy {row['scipy']:.1f} images/s, ratio {row['ours'] / row['scipy']:.1f}, max |Δ| {diff:.1e}"
            )
            results.append(row)
    return results


# ---------------------------------------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    lines = [
        "| Images | Removed | (a) `road_impute` images/s | (b) scipy images/s | (a) ÷ (b) | max \\|(a) − (b)\\| "
        "| Target | Met |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        ratio = r["ours"] / r["scipy"]
        targeted = r["size"] == TARGET_SIZE
        lines.append(
            f"| {r['size']}×{r['size']}×{CHANNELS} | {r['fraction']:.0%} | {r['ours']:.0f} | {r['scipy']:.1f} | "
            f"{ratio:.1f}× | {r['diff']:.1e} | {f'≥ {TARGET:.0f}×' if targeted else '—'} | "
            f"{('yes' if ratio >= TARGET else '**no**') if targeted else '—'} |"
        )
    return "\n".join(lines)


def settings_text(results: list[dict], s: Settings) -> str:
    cells = ", ".join(
        f"{r['size']}×{r['size']} at {r['fraction']:.0%}: {r['n_ours']} images in batches of {r['batch']} "
        f"vs {r['n_scipy']}"
        for r in results
    )
    return (
        f"uniform random images (3 channels, float32, seeded) and random pixel masks; (a) "
        "`road_impute(images, removed, noise=0.01, generator=...)` on the CPU (the solve itself runs on one "
        "intra-op thread, see `roar.perturb.road`), (b) one `spsolve` per image with the matrix built by "
        f"vectorised numpy (SuperLU, single-threaded). Images per round, (a) vs (b): {cells}. Best of {s.rounds} "
        f"round{'s' if s.rounds > 1 else ''} after a warm-up; the last column compares (b) with (a) without noise."
    )


def targets_text(results: list[dict]) -> str:
    cells = [r for r in results if r["size"] == TARGET_SIZE]
    ratios = ", ".join(f"{r['fraction']:.0%}: {r['ours'] / r['scipy']:.1f}×" for r in cells)
    met = all(r["ours"] / r["scipy"] >= TARGET for r in cells)
    return (
        f"- `road_impute` ≥ {TARGET:.0f}× scipy's images/s at {TARGET_SIZE}×{TARGET_SIZE} on the CPU: "
        f"{'met' if met else 'not met'} ({ratios})."
    )


def render(command: str, results: list[dict], s: Settings, load_start: float, load_end: float) -> str:
    parts = [
        *header(SECTION, command, load_start, load_end, f"scipy {scipy.__version__}"),
        f"- Settings: {settings_text(results, s)}",
        "",
        table(results),
        "",
        "Where the time goes: (a) is bound by memory traffic over the padded grid of every channel: ~55 "
        "element-wise passes of setup, ~22 per iteration of its preconditioned CG (~4 iterations at 10 % "
        "removed, ~9 at 50 %, ~23 at 90 % at 32×32), and the noise drawn for every pixel (~25 passes' worth, "
        "which (b) does not do). It sweeps the whole grid whatever the fraction, so its images/s fall only ~3× "
        "from 10 % to 90 % removed while (b)'s fall ~7×: (b)'s SuperLU factorises the system of an image's "
        "removed pixels, at most 1024 unknowns at 32×32, in about a millisecond, and a system of 10 % of "
        "the pixels, mostly isolated ones, much faster, which is why 10 % is the furthest from the target; "
        "at 224×224 with 10 % removed (b)'s system is nearly diagonal while (a) still sweeps the whole grid.",
        "",
        "Targets:",
        "",
        targets_text(results),
    ]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = bench_parser("benchmarks.road", __doc__, "smoke test: a few images per cell, one round").parse_args(argv)
    s = PRESETS["quick" if args.quick else "default"]
    return bench_run(
        "benchmarks.road", argv, args.write, lambda log: measure(s, log), lambda c, r, a, b: render(c, r, s, a, b)
    )


if __name__ == "__main__":
    raise SystemExit(main())
