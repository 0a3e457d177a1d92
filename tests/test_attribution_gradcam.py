"""Grad-CAM against Captum's LayerGradCam + bilinear interpolation, and layer resolution."""

from __future__ import annotations

import pytest
import torch
from helpers import model_batch, small_resnet8

from roar.attribution.gradcam import GradCAM, resolve_layer
from roar.attribution.registry import METHODS
from roar.core.errors import RoarError


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: see ``one_thread`` in conftest."""


@pytest.fixture(scope="module")
def batch():
    return model_batch(size=32)


def captum_gradcam(model, layer, images, targets):
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(model, layer).attribute(images, target=targets, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(images.shape[2:]), interpolate_mode="bilinear").detach()


@pytest.mark.parametrize("layer,module", [("layer3", "net.layer3"), ("net.layer2", "net.layer2"), ("stem", "net.stem")])
def test_matches_captum(batch, layer, module):
    model, images, targets = batch
    ours = GradCAM(layer=layer)(model, images, targets)
    reference = captum_gradcam(model, dict(model.named_modules())[module], images, targets)
    assert ours.shape == (4, 1, 32, 32) and ours.dtype == torch.float32
    assert reference.abs().max() > 0
    assert float((ours - reference).abs().max() / reference.abs().max()) < 1e-4
    assert (ours >= 0).all()


def test_auto_is_last_conv_stage(batch):
    model, images, targets = batch
    assert resolve_layer(model, "auto", images)[0] == "net.layer3"
    assert torch.equal(GradCAM()(model, images, targets), GradCAM(layer="net.layer3")(model, images, targets))
    assert METHODS.create("gradcam").params.layer == "auto"


def test_layer_names():
    model = small_resnet8()
    assert resolve_layer(model, "layer3") == ("net.layer3", model.net.layer3)
    assert resolve_layer(model, "layer1.conv2")[0] == "net.layer1.conv2"
    with pytest.raises(RoarError, match=r"unknown layer 'layr3' \(did you mean 'layer3'\?\)"):
        GradCAM(layer="layr3")(model, torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(RoarError, match="ambiguous: net.layer1.conv1, net.layer2.conv1"):
        resolve_layer(model, "conv1")


def test_relu_flag_and_deterministic(batch):
    from captum.attr import LayerAttribution, LayerGradCam

    model, images, targets = batch
    signed = GradCAM(layer="layer2", relu=False)(model, images, targets)
    reference = LayerGradCam(model, model.net.layer2).attribute(images, target=targets, relu_attributions=False)
    reference = LayerAttribution.interpolate(reference, (32, 32), interpolate_mode="bilinear").detach()
    assert (signed < 0).any()
    assert float((signed - reference).abs().max() / reference.abs().max()) < 1e-4
    rectified = GradCAM(layer="layer2")(model, images, targets)
    assert torch.equal(rectified, GradCAM(layer="layer2")(model, images, targets))
    assert torch.allclose(rectified, GradCAM(layer="layer2", max_batch=3)(model, images, targets), atol=1e-6)


def test_leaves_model_untouched(batch):
    model, images, targets = batch
    model.train()
    GradCAM(layer="layer3")(model, images, targets)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    model.eval()


def test_non_spatial_layer_rejected(batch):
    model, images, targets = batch
    with pytest.raises(RoarError, match=r"\[B, C, h, w\]"):
        GradCAM(layer="fc")(model, images, targets)
