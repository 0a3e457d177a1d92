"""Plug-in methods named by a dotted path, and the Captum adapter.

The plug-in functions live in this module; their dotted paths are built from ``__name__``, so
they resolve however pytest imported this file (``test_plugins`` or ``tests.test_plugins``).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import model_batch
from pydantic import ValidationError

from roar.attribution.engine import input_gradients
from roar.attribution.gradcam import GradCAM
from roar.attribution.plugins import PluginAttribution, as_attribution_map, captum
from roar.attribution.registry import METHODS
from roar.core.errors import RoarError


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: see ``one_thread`` in conftest."""


def full_map(model, images, targets, scale=1.0):
    return images * scale


def one_channel(model, images, targets):
    return images.mean(dim=1, keepdim=True)


def no_channel_numpy(model, images, targets):
    return images.sum(dim=1).numpy().astype(np.float64)


def wrong_shape(model, images, targets):
    return images[:, :, :4]


def not_an_array(model, images, targets):
    return [1, 2, 3]


SEEN: dict = {}


def records_state(model, images, targets):
    SEEN.update(training=model.training, grads=[p.requires_grad for p in model.parameters()])
    return images


def path(name: str) -> str:
    return f"{__name__}.{name}"


@pytest.fixture(scope="module")
def batch():
    return model_batch(size=16, varied_batchnorm=False)


def test_not_registered_but_configured():
    assert "plugin" not in METHODS
    method = PluginAttribution(method=path("full_map"), kwargs={"scale": 2.0})
    assert method.name == "plugin" and method.params.kwargs == {"scale": 2.0}
    assert PluginAttribution(method=path("full_map")).params.kwargs == {}
    with pytest.raises(ValidationError, match="unknown key 'kwarg'"):
        PluginAttribution(method=path("full_map"), kwarg={})


def test_output_shapes_normalised(batch):
    model, images, targets = batch
    full = PluginAttribution(method=path("full_map"), kwargs={"scale": 2.0})(model, images, targets)
    assert full.shape == (4, 3, 16, 16) and torch.allclose(full, images * 2)
    single = PluginAttribution(method=path("one_channel"))(model, images, targets)
    assert single.shape == (4, 1, 16, 16) and torch.allclose(single, images.mean(1, keepdim=True))
    from_numpy = PluginAttribution(method=path("no_channel_numpy"))(model, images, targets)
    assert from_numpy.shape == (4, 1, 16, 16) and from_numpy.dtype == torch.float32
    assert torch.allclose(from_numpy[:, 0], images.sum(1))


def test_model_frozen_during_call(batch):
    model, images, targets = batch
    model.train()
    PluginAttribution(method=path("records_state"))(model, images, targets)
    assert SEEN["training"] is False and SEEN["grads"] and not any(SEEN["grads"])
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()


@pytest.mark.parametrize(
    "bad", ["no_such_package_xyz.module.fn", "roar.attribution.plugins.no_such_function", "nodots", "roar..fn"]
)
def test_bad_path(bad):
    with pytest.raises(RoarError, match=f"plug-in '{bad.replace('.', '[.]')}'"):
        PluginAttribution(method=bad)


def test_bad_path_suggests_close_name():
    with pytest.raises(RoarError, match=r"has no 'full_mapp' \(did you mean 'full_map'\?\)"):
        PluginAttribution(method=path("full_mapp"))
    with pytest.raises(RoarError, match="not a function"):
        PluginAttribution(method=path("SEEN"))


def test_bad_output(batch):
    model, images, targets = batch
    with pytest.raises(RoarError, match=r"plug-in '.*wrong_shape' returned shape \[4, 3, 4, 16\]"):
        PluginAttribution(method=path("wrong_shape"))(model, images, targets)
    with pytest.raises(RoarError, match="returned list"):
        PluginAttribution(method=path("not_an_array"))(model, images, targets)
    with pytest.raises(RoarError, match=r"returned shape \[4, 2, 16, 16\]"):
        as_attribution_map(torch.zeros(4, 2, 16, 16), images, "x.y")
    with pytest.raises(RoarError, match=r"returned shape \[3, 16, 16\]"):
        as_attribution_map(torch.zeros(3, 16, 16), images, "x.y")


def test_captum_saliency_equals_gradient(batch):
    model, images, targets = batch
    method = PluginAttribution(
        method="roar.attribution.plugins.captum", kwargs={"attribution": "Saliency", "abs": False}
    )
    ours = input_gradients(model, images, targets)
    out = method(model, images, targets)
    assert out.shape == images.shape
    assert float((out - ours).abs().max() / ours.abs().max()) < 1e-4
    absolute = PluginAttribution(method="roar.attribution.plugins.captum", kwargs={"attribution": "Saliency"})
    assert torch.allclose(absolute(model, images, targets), ours.abs(), atol=1e-6)  # Captum's default: |grad|


def test_captum_layer_gradcam(batch):
    model, images, targets = batch
    method = PluginAttribution(
        method="roar.attribution.plugins.captum",
        kwargs={"attribution": "LayerGradCam", "layer": "layer3", "relu_attributions": True},
    )
    out = method(model, images, targets)
    expected = GradCAM(layer="layer3")(model, images, targets)
    assert out.shape == (4, 1, 16, 16)
    assert float((out - expected).abs().max() / expected.abs().max()) < 1e-4


def test_captum_errors(batch, monkeypatch):
    model, images, targets = batch
    with pytest.raises(RoarError, match=r"no method 'Saliancy' \(did you mean 'Saliency'\?\)"):
        captum(model, images, targets, attribution="Saliancy")
    with pytest.raises(RoarError, match="needs a 'layer'"):
        captum(model, images, targets, attribution="LayerGradCam")
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # as if captum were not installed
    with pytest.raises(RoarError, match=r"install the captum extra: pip install 'roar\[captum\]'"):
        captum(model, images, targets, attribution="Saliency")


def test_plugin_with_model_free_function():
    images = torch.rand(2, 3, 5, 5)
    out = PluginAttribution(method=path("one_channel"))(None, images, torch.zeros(2))
    assert out.shape == (2, 1, 5, 5)


def test_dotted_path_to_attribute_of_a_class():
    method = PluginAttribution(method="roar.attribution.plugins.PluginAttribution.__repr__")
    assert method.function is PluginAttribution.__repr__
