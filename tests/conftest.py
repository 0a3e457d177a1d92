"""Shared fixtures: tiny configs and datasets that build in a second and never download."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One dataset cache for the whole session, outside the working tree."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_overrides(data_root, tmp_path) -> list[str]:
    """Overrides that turn the smoke config into a run of a few seconds in ``tmp_path``."""
    return [
        f"dataset.root={data_root}",
        f"output_dir={tmp_path / 'run'}",
        "dataset.train_size=192",
        "dataset.test_size=64",
        "model.widths=[8,8,16]",
        "training.epochs=3",
        "training.batch_size=64",
    ]
