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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_root):
    """A small ResNet8 trained for a few seconds on shapes: a model whose logits mean something."""
    from roar.config import load_config
    from roar.stages.train import run as train

    out = tmp_path_factory.mktemp("trained")
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"dataset.root={data_root}",
            f"output_dir={out}",
            "dataset.train_size=1536",
            "dataset.test_size=256",
            "model.widths=[16,16,32]",
            "training.epochs=6",
        ],
    )
    train(cfg)
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: fastest, and immune to a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
