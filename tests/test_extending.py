"""The worked examples of docs/architecture.md: a method and a fill, each one file, work end to end.

Each example registers itself on import; the fixtures import it fresh and take it out of its
registry afterwards, so no other test sees it.
"""

import importlib
import sys

import pytest
import torch
from torch import nn

from roar.attribution import METHODS, create
from roar.config import config_from_dict
from roar.core.errors import RoarError
from roar.perturb import FILLS, ablate, build_fill


def _registered(module: str, registry, name: str):
    sys.modules.pop(module, None)
    imported = importlib.import_module(module)
    assert name in registry
    yield imported
    registry.unregister(name)
    sys.modules.pop(module, None)


@pytest.fixture
def abs_gradient():
    yield from _registered("examples.method_example", METHODS, "abs_gradient")


@pytest.fixture
def uniform_noise():
    yield from _registered("examples.fill_example", FILLS, "uniform_noise")


def test_the_method_example_is_configurable_and_gives_the_absolute_weights(abs_gradient):
    cfg = config_from_dict({"attribution": {"methods": ["abs_gradient", {"name": "big", "method": "abs_gradient"}]}})
    assert [e.method for e in cfg.attribution.entries()] == ["abs_gradient", "abs_gradient"]
    with pytest.raises(RoarError, match="max_bach"):
        config_from_dict({"attribution": {"methods": [{"name": "abs_gradient", "max_bach": 3}]}})
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images = torch.rand(5, 3, 2, 2)
    targets = torch.tensor([0, 1, 2, 1, 0])
    maps = create("abs_gradient")(linear, images, targets)
    expected = linear[1].weight.detach()[targets].abs().view(5, 3, 2, 2)  # logit_c = w_c · x + b_c
    assert torch.allclose(maps, expected)
    assert "abs_gradient" not in [n for n in METHODS.names() if n != "abs_gradient"]


def test_the_fill_example_is_configurable_batch_invariant_and_leaves_kept_pixels(uniform_noise):
    cfg = config_from_dict(
        {"retrain": {"fill": {"name": "uniform_noise", "seed": 3}}, "curves": {"fill": "uniform_noise"}}
    )
    assert cfg.retrain.fill.seed == 3 and cfg.curves.fill.seed == 0
    with pytest.raises(RoarError, match=r"retrain.fill.sed: unknown key 'sed' \(did you mean 'seed'\?\)"):
        config_from_dict({"retrain": {"fill": {"name": "uniform_noise", "sed": 3}}})
    fill = build_fill(cfg.retrain.fill)
    images = torch.rand(4, 3, 5, 5)
    removed = torch.rand(4, 1, 5, 5) > 0.5
    indices = torch.tensor([7, 1, 9, 4])
    together = ablate(images, removed.expand_as(images), fill, indices=indices)
    alone = torch.cat(
        [
            ablate(images[i : i + 1], removed[i : i + 1].expand(1, 3, 5, 5), fill, indices=indices[i : i + 1])
            for i in range(4)
        ]
    )
    assert torch.equal(together, alone)
    kept = ~removed.expand_as(images)
    assert torch.equal(together[kept], images[kept])
    assert ((together >= 0) & (together <= 1)).all() and not torch.equal(together, images)


def test_fills_are_typed_in_every_section():
    with pytest.raises(RoarError, match=r"retrain.fill.sigmaa: unknown key 'sigmaa' \(did you mean 'sigma'\?\)"):
        config_from_dict({"roar": {"fill": {"name": "blur", "sigmaa": 2}}})
    with pytest.raises(RoarError, match=r"curves.fill.name: unknown fill 'blurr' \(did you mean 'blur'\?\)"):
        config_from_dict({"curves": {"fill": {"name": "blurr"}}})
    with pytest.raises(RoarError, match="retrain.fill: expected a fill name or a mapping with 'name'"):
        config_from_dict({"retrain": {"fill": 3}})
    with pytest.raises(RoarError, match=r"retrain.fill.mean: needs one value in \[0, 1\] per channel"):
        config_from_dict({"retrain": {"fill": {"name": "mean", "mean": [2]}}})
    with pytest.raises(RoarError, match="replaces whole patches"):
        config_from_dict({"retrain": {"fill": "patch_mean"}})
    with pytest.raises(RoarError, match="set granularity: patch"):
        config_from_dict({"curves": {"fill": "patch_mean"}})
    assert config_from_dict({"curves": {"fill": "patch_mean", "granularity": "patch"}}).curves.fill.name == "patch_mean"
    with pytest.raises(RoarError, match="'lerf' is the old name of 'curves'"):
        config_from_dict({"lerf": {}, "curves": {}})
    assert config_from_dict({"lerf": {"max_images": 3}}).curves.max_images == 3
