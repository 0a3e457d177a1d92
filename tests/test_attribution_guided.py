"""Guided backprop: equal to Captum on ResNet8, and right where module hooks are not enough.

Captum's ``GuidedBackprop`` hooks ``nn.ReLU`` modules through tensor hooks set in forward
pre-hooks (not ``register_full_backward_hook``), which handles torchvision's BasicBlock (one
``nn.ReLU(inplace=True)`` called twice, ``out += identity``): on ResNet8 it is an exact reference.
It does not see functional ReLUs, so a hand-built network with functional, in-place, reused and
tensor-method ReLUs and a residual add is checked against an analytic guided gradient and against
an independent implementation (masks and output-gradient hooks instead of an autograd Function).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import model_batch
from torch import nn

from roar.attribution.engine import input_gradients
from roar.attribution.guided import GuidedBackprop, backward_rule, guided_relu
from roar.attribution.registry import METHODS


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: see ``one_thread`` in conftest."""


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def batch():
    return model_batch(size=16)


def test_registered():
    assert "guided_backprop" in METHODS
    method = METHODS.create("guided_backprop", max_batch=7)
    assert isinstance(method, GuidedBackprop) and method.params.max_batch == 7 and method.passes == 1


def test_matches_captum_on_resnet8(batch):
    from captum.attr import GuidedBackprop as CaptumGuidedBackprop

    model, images, targets = batch
    ours = GuidedBackprop()(model, images, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = CaptumGuidedBackprop(model).attribute(images.clone(), target=targets)
    assert ours.shape == images.shape and ours.dtype == torch.float32
    assert relative_error(ours, reference) < 1e-4
    plain = input_gradients(model, images, targets)
    assert relative_error(ours, plain) > 0.05  # the guided rule is actually in effect


def test_deterministic_and_chunking_invariant(batch):
    model, images, targets = batch
    first = GuidedBackprop()(model, images, targets)
    assert torch.equal(first, GuidedBackprop()(model, images, targets))
    assert torch.allclose(first, GuidedBackprop(max_batch=3)(model, images, targets), rtol=1e-5, atol=1e-7)


def test_parameters_and_mode_restored(batch):
    model, images, targets = batch
    model.train()
    GuidedBackprop()(model, images, targets)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    model.eval()


class ResidualMLP(nn.Module):
    """Every ReLU flavour: functional, in-place module used twice (second after ``+=``), torch.relu."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        h1 = F.relu(self.l1(x))
        out = self.relu(self.l2(h1))
        out = self.l3(out)
        out += h1
        out = self.relu(out)
        return self.head(torch.relu(self.l4(out)))


def analytic_guided(model: ResidualMLP, x: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """The guided gradient of ResidualMLP written out by hand, in float64."""
    W = {name: getattr(model, name).weight.detach().double().numpy() for name in ("l1", "l2", "l3", "l4", "head")}
    b = {name: getattr(model, name).bias.detach().double().numpy() for name in ("l1", "l2", "l3", "l4", "head")}
    out = []
    for row, target in zip(x.double().numpy(), targets.numpy()):
        p1 = W["l1"] @ row + b["l1"]
        h1 = np.maximum(p1, 0)
        p2 = W["l2"] @ h1 + b["l2"]
        p3 = W["l3"] @ np.maximum(p2, 0) + b["l3"] + h1
        p4 = W["l4"] @ np.maximum(p3, 0) + b["l4"]
        g = W["head"][target]
        gp4 = np.maximum(g, 0) * (p4 > 0)
        gp3 = np.maximum(W["l4"].T @ gp4, 0) * (p3 > 0)
        gp2 = np.maximum(W["l3"].T @ gp3, 0) * (p2 > 0)
        gh1 = W["l2"].T @ gp2 + gp3  # through l2 and through the residual
        gp1 = np.maximum(gh1, 0) * (p1 > 0)
        out.append(W["l1"].T @ gp1)
    return np.stack(out)


def test_hand_computed_guided_gradient_with_every_relu_flavour():
    model = ResidualMLP().eval()
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(4))
    targets = torch.arange(64) % 3
    ours = input_gradients(model, x, targets, rules=guided_relu)
    expected = analytic_guided(model, x, targets)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-4, atol=1e-6)
    plain = input_gradients(model, x, targets)
    assert not np.allclose(plain.numpy(), expected, atol=1e-3)


def reference_relu(x: torch.Tensor) -> torch.Tensor:
    """Guided ReLU by other means: a forward mask, and a hook rectifying the output's gradient."""
    out = x * (x > 0)
    out.register_hook(lambda grad: grad.clamp(min=0))
    return out


class TinyResNet(nn.Module):
    """Conv net with functional, in-place (reused) module, torch.relu_, Tensor.relu ReLUs and ``+=``."""

    def __init__(self, reference: bool = False):
        super().__init__()
        torch.manual_seed(5)
        self.reference = reference
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv4 = nn.Conv2d(6, 6, 3, padding=1, stride=2)
        self.fc = nn.Linear(6, 5)
        self.relu = nn.ReLU(inplace=True)

    def act(self, x, relu):
        return reference_relu(x) if self.reference else relu(x)

    def forward(self, x):
        h = self.act(self.conv1(x - 0.5), F.relu)
        out = self.act(self.conv2(h), self.relu)
        out = self.conv3(out)
        out += h
        out = self.act(out, self.relu)
        out = self.act(self.conv4(out), torch.relu_)
        out = self.act(out * 1.5, torch.Tensor.relu)
        return self.fc(out.mean(dim=(2, 3)))


def test_independent_implementation_on_conv_residual_net():
    model, reference = TinyResNet().eval(), TinyResNet(reference=True).eval()
    reference.load_state_dict(model.state_dict())
    images = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    targets = torch.arange(8) % 5
    ours = GuidedBackprop()(model, images, targets)
    expected = input_gradients(reference, images, targets)
    assert relative_error(ours, expected) < 1e-4
    assert relative_error(input_gradients(model, images, targets), expected) > 0.05


ENTRY_POINTS = [
    (F, "relu"),
    (F, "relu_"),
    (torch, "relu"),
    (torch, "relu_"),
    (torch.Tensor, "relu"),
    (torch.Tensor, "relu_"),
]


def unpatched(before: list) -> bool:
    return all(getattr(owner, attr) is orig for (owner, attr), orig in zip(ENTRY_POINTS, before))


def test_restored_after_exit_and_after_exception():
    before = [getattr(owner, attr) for owner, attr in ENTRY_POINTS]
    with guided_relu():
        assert all(getattr(owner, attr) is not orig for (owner, attr), orig in zip(ENTRY_POINTS, before))
    assert unpatched(before)
    with pytest.raises(ValueError, match="boom"), guided_relu(), guided_relu():  # nested, then failing
        raise ValueError("boom")
    assert unpatched(before)
    assert "relu" not in vars(torch.Tensor)  # inherited from the C base, not copied onto Tensor


def test_backward_rule_restores_partial_patches_when_one_fails():
    class Owner:
        f = staticmethod(lambda: 1)

    original = vars(Owner)["f"]
    with pytest.raises(AttributeError), backward_rule((Owner, "f", lambda o: o), (Owner, "missing", lambda o: o)):
        pass
    assert vars(Owner)["f"] is original


def test_functional_and_torch_relu_covered():
    x = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
    upstream = torch.tensor([5.0, -7.0, 11.0])
    flavours = (  # looked up at call time, inside the context, as nn.ReLU.forward does
        lambda t: F.relu(t),
        lambda t: torch.relu(t),
        lambda t: t.relu(),
        lambda t: F.relu(t * 1, inplace=True),
        lambda t: F.relu_(t * 1),
        lambda t: torch.relu_(t * 1),
        lambda t: (t * 1).relu_(),
        lambda t: nn.ReLU(inplace=True)(t * 1),
    )
    for relu in flavours:
        with guided_relu():
            (grad,) = torch.autograd.grad((relu(x) * upstream).sum(), x)
        assert grad.tolist() == [0.0, 0.0, 11.0]
    (grad,) = torch.autograd.grad((F.relu(x) * upstream).sum(), x)  # outside: the plain gradient again
    assert grad.tolist() == [0.0, -7.0, 11.0]


def test_forward_unchanged_and_no_grad_passthrough(batch):
    model, images, _ = batch
    with torch.no_grad():
        plain = model(images)
        with guided_relu():
            guided = model(images)
    assert torch.equal(plain, guided)
