"""Figures: matplotlib without a display, saved so that a killed run never leaves half a PNG."""

from __future__ import annotations

from pathlib import Path

from roar.core.atomic import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed, same output everywhere)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Save ``fig`` under a temporary name, fsync it, rename it over ``path``, and close the figure.

    The temporary name keeps ``path``'s extension, from which matplotlib picks the file format.
    """
    path = Path(path)
    try:
        with atomic_path(path, suffix=f".tmp{path.suffix}") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        pyplot().close(fig)
