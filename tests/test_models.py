"""Models: every registered model builds and runs; ResNet8 is the seed's; weights load safely."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from roar.core.errors import RoarError
from roar.models import MODELS, Classifier, build_model
from roar.models.resnet8 import ResNet8Config
from roar.models.resnet50 import ResNet50Config

GEOMETRY = {"resnet8": (3, 32, 32), "resnet50": (3, 64, 64), "mlp": (2,)}


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_maps_inputs_to_logits(name):
    cfg = MODELS.config_class(name)()
    geometry = GEOMETRY[name]
    model = build_model(cfg, 7, geometry, mean=(0.5,) * geometry[0], std=(0.25,) * geometry[0]).eval()
    out = model(torch.rand(2, *geometry))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_seed_resnet8_has_about_1_2_million_parameters():
    model = build_model(ResNet8Config(), 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    count = sum(p.numel() for p in model.parameters())
    assert 1.15e6 < count < 1.25e6, count
    net = model.net
    assert [net.layer1.conv1.out_channels, net.layer2.conv1.out_channels, net.layer3.conv1.out_channels] == [
        64,
        128,
        256,
    ]
    assert [net.layer1.conv1.stride[0], net.layer2.conv1.stride[0], net.layer3.conv1.stride[0]] == [1, 2, 2]


def test_classifier_normalises_inside():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.flatten(1)

    model = Classifier(Probe(), mean=(0.5, 0.25), std=(0.5, 0.25))
    model(torch.tensor([[[[1.0]], [[0.5]]]]))
    torch.testing.assert_close(seen["x"].flatten(), torch.tensor([1.0, 1.0]))


def test_resnet50_loads_a_local_state_dict_and_replaces_the_head(tmp_path):
    source = build_model(ResNet50Config(), 1000, (3, 64, 64), (0.5,) * 3, (0.25,) * 3).net
    path = tmp_path / "r50.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ResNet50Config(weights=str(path)), 5, (3, 64, 64), (0.5,) * 3, (0.25,) * 3)
    torch.testing.assert_close(model.net.conv1.weight, source.conv1.weight)
    assert model.net.fc.out_features == 5


def test_resnet50_weight_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(RoarError, match="no file at"):
        build_model(ResNet50Config(weights=str(tmp_path / "none.pth")), 10, (3, 64, 64), (0.5,) * 3, (0.25,) * 3)
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(RoarError, match="not a resnet50 state dict"):
        build_model(ResNet50Config(weights=str(bad)), 10, (3, 64, 64), (0.5,) * 3, (0.25,) * 3)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.models.ResNet50_Weights.get_state_dict", offline)
    with pytest.raises(RoarError, match="set model.weights to its path"):
        build_model(ResNet50Config(weights="imagenet"), 10, (3, 64, 64), (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("stride, channels, width", [(1, 8, 8), (2, 8, 16), (2, 4, 4)])
def test_resnet8_block_is_torchvisions_basic_block(stride, channels, width):
    """Same modules, same state-dict keys, same outputs and gradients, in training and in evaluation."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock as Reference

    from roar.models.resnet8 import BasicBlock

    def downsample():
        if stride == 1 and channels == width:
            return None
        return nn.Sequential(nn.Conv2d(channels, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))

    torch.manual_seed(0)
    ours, reference = (
        BasicBlock(channels, width, stride, downsample()),
        Reference(channels, width, stride, downsample()),
    )
    assert list(ours.state_dict()) == list(reference.state_dict())
    modules = [[(name, type(m)) for name, m in net.named_modules()][1:] for net in (ours, reference)]
    assert modules[0] == modules[1]
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(4, channels, 8, 8)
    for mode in (True, False):
        ours.train(mode), reference.train(mode)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = ours(a), reference(b)
        torch.testing.assert_close(out, ref)
        out.square().sum().backward(), ref.square().sum().backward()
        torch.testing.assert_close(a.grad, b.grad)
