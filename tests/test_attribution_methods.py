"""Gradient, grad×input, IG, EG and the noise tunnels: analytic answers on a linear model,
invariants on ResNet8, and equality with Captum."""

from __future__ import annotations

import pytest
import torch
from helpers import model_batch
from torch import nn

import roar.attribution.gradient  # noqa: F401  (registers the methods used here)
import roar.attribution.integrated  # noqa: F401
import roar.attribution.noise  # noqa: F401
from roar.attribution.base import Context
from roar.attribution.integrated import quadrature
from roar.attribution.registry import METHODS

captum_attr = pytest.importorskip("captum.attr")


def create(name, **params):
    return METHODS.create(name, **params)


class Linear(nn.Module):
    """f(x) = W · flatten(x) + b: every gradient method has a closed form."""

    def __init__(self, shape=(3, 4, 4), classes=5):
        super().__init__()
        self.fc = nn.Linear(int(torch.tensor(shape).prod()), classes)
        self.shape = shape

    def forward(self, x):
        return self.fc(x.flatten(1))

    def w(self, targets):
        return self.fc.weight[targets].view(-1, *self.shape)


@pytest.fixture
def linear():
    torch.manual_seed(0)
    model = Linear().eval()
    x = torch.rand(6, 3, 4, 4)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    return model, x, t, model.w(t).detach()


@pytest.fixture(scope="module")
def resnet():
    return model_batch(size=16, full_range=True)


def assert_close_rel(a, b, rel=1e-4):
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() / scale < rel, f"max relative difference {((a - b).abs().max() / scale):.2e}"


# ---------------------------------------------------------------- analytic, linear model


def test_gradient_is_w_and_grad_x_input_is_x_times_w(linear):
    model, x, t, w = linear
    torch.testing.assert_close(create("gradient")(model, x, t), w)
    torch.testing.assert_close(create("grad_x_input")(model, x, t), x * w)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid", "riemann_middle"])
def test_ig_with_black_baseline_is_x_times_w(linear, rule):
    model, x, t, w = linear
    torch.testing.assert_close(create("integrated_gradients", steps=7, rule=rule)(model, x, t), x * w)


def test_smoothgrad_is_w_vargrad_is_zero_sg_sq_is_w_squared(linear):
    model, x, t, w = linear
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(create("smoothgrad", samples=10)(model, x, t, generator=g), w)
    assert create("vargrad", samples=10)(model, x, t, generator=g).abs().max() < 1e-10
    torch.testing.assert_close(create("smoothgrad_sq", samples=10)(model, x, t, generator=g), w.square())


def test_expected_gradients_with_one_reference_is_x_minus_reference_times_w(linear):
    model, x, t, w = linear
    reference = torch.rand(1, 3, 4, 4)
    out = create("expected_gradients", samples=9)(model, x, t, context=Context(references=reference))
    torch.testing.assert_close(out, (x - reference) * w)


def test_quadrature_weights_sum_to_one_and_points_lie_in_the_unit_interval():
    for rule in ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]:
        alphas, weights = quadrature(rule, 11)
        assert abs(weights.sum().item() - 1) < 1e-6 and alphas.min() >= 0 and alphas.max() <= 1


def test_smoothgrad_noise_is_independent_per_copy(linear):
    """Each copy's noise is drawn around the clean image: no random walk (the PGIG seed's bug)."""
    model, x, t, w = linear
    seen = []

    class Recorder(nn.Module):
        def forward(self, inputs):
            seen.append(inputs.detach().clone())
            return model(inputs)

    create("smoothgrad", samples=400, max_batch=6)(Recorder(), x, t, generator=torch.Generator().manual_seed(1))
    noise = torch.stack(seen) - x  # one engine chunk per copy: [copies, B, C, H, W]
    sigma = 0.15 * (x.flatten(1).max(1).values - x.flatten(1).min(1).values)
    spread = noise.flatten(2).std(dim=(0, 2)) / sigma
    assert torch.allclose(spread, torch.ones_like(spread), atol=0.05)
    first, last = noise[:50].std(), noise[-50:].std()
    assert abs(last / first - 1) < 0.1, "noise grows with the copy index: copies are not independent"
    lagged = torch.corrcoef(torch.stack([noise[:-1].flatten(), noise[1:].flatten()]))[0, 1]
    assert abs(lagged) < 0.05


# ---------------------------------------------------------------- invariants on ResNet8


def test_ig_completeness_on_trained_resnet8(trained_run):
    """Σ attributions ≈ f(x) − f(x′): within 1% over a batch at 50 steps, and closer with more."""
    from roar.data import build_dataset
    from roar.training import load_trained_model

    model, _ = load_trained_model(trained_run.run_dir / "train" / "model.pt")
    images = build_dataset(trained_run.dataset).test.images[:32].float() / 255
    targets = model(images).argmax(1)
    with torch.no_grad():
        delta = (model(images) - model(torch.zeros_like(images))).gather(1, targets[:, None]).squeeze(1)

    def error(steps):
        attr = create("integrated_gradients", steps=steps)(model, images, targets)
        return ((attr.flatten(1).sum(1) - delta).abs().sum() / delta.abs().sum()).item()

    assert error(50) < 0.01
    assert error(200) < error(10)


def test_vargrad_is_never_negative_and_methods_are_deterministic(resnet):
    model, images, targets = resnet
    for name in ["vargrad", "gb_vargrad"]:
        a = create(name, samples=8)(model, images, targets, generator=torch.Generator().manual_seed(3))
        b = create(name, samples=8)(model, images, targets, generator=torch.Generator().manual_seed(3))
        assert (a >= 0).all() and torch.equal(a, b)


def test_chunking_does_not_change_results(resnet):
    model, images, targets = resnet
    big = create("integrated_gradients", steps=20, max_batch=512)(model, images, targets)
    small = create("integrated_gradients", steps=20, max_batch=7)(model, images, targets)
    assert_close_rel(small, big, 1e-5)


def test_methods_that_share_passes_declare_the_same_key():
    assert create("gradient").shared_key() == create("grad_x_input").shared_key()
    keys = {create(n, samples=5).shared_key() for n in ["smoothgrad", "smoothgrad_sq", "vargrad"]}
    assert len(keys) == 1
    assert create("smoothgrad", sigma=0.2).shared_key() != create("vargrad", sigma=0.1).shared_key()
    assert create("ig_smoothgrad").shared_key() != create("smoothgrad").shared_key()


def test_parameters_are_frozen_and_restored(resnet):
    model, images, targets = resnet
    flags = [p.requires_grad for p in model.parameters()]
    create("gradient")(model, images, targets)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters()), "extraction must not compute weight gradients"


# ---------------------------------------------------------------- equality with Captum


def test_gradient_and_grad_x_input_equal_captum(resnet):
    model, images, targets = resnet
    saliency = captum_attr.Saliency(model).attribute(images.clone(), target=targets, abs=False)
    assert_close_rel(create("gradient")(model, images, targets), saliency)
    ixg = captum_attr.InputXGradient(model).attribute(images.clone(), target=targets)
    assert_close_rel(create("grad_x_input")(model, images, targets), ixg)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_equal_captum(resnet, rule):
    model, images, targets = resnet
    steps = 50
    ours = create("integrated_gradients", steps=steps, rule=rule)(model, images, targets)
    theirs = captum_attr.IntegratedGradients(model).attribute(
        images.clone(), baselines=torch.zeros_like(images), target=targets, n_steps=steps, method=rule
    )
    if rule == "riemann_trapezoid":
        # Captum's trapezoid weights are 1/n (halved at the ends), summing to (n−1)/n instead of 1,
        # which breaks completeness by 1/n; ours are 1/(n−1). Same points, so only the scale differs.
        theirs = theirs * steps / (steps - 1)
    assert_close_rel(ours, theirs)


@pytest.mark.parametrize(
    ("name", "nt_type"), [("smoothgrad", "smoothgrad"), ("smoothgrad_sq", "smoothgrad_sq"), ("vargrad", "vargrad")]
)
def test_noise_tunnel_equals_captum_fed_the_same_noise(resnet, monkeypatch, name, nt_type):
    model, images, targets = resnet
    n, seed = 6, 11
    ours = create(name, samples=n)(model, images, targets, generator=torch.Generator().manual_seed(seed))
    # Our copies draw noise [n, B, C, H, W]; Captum repeats each image n times in a row ([B·n]).
    noise = torch.randn((n, *images.shape), generator=torch.Generator().manual_seed(seed)) * 0.15
    monkeypatch.setattr(torch, "normal", lambda mean, std: noise.transpose(0, 1).reshape(-1, *images.shape[1:]))
    theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        images.clone(), nt_type=nt_type, nt_samples=n, stdevs=0.15, target=targets, abs=False
    )
    assert_close_rel(ours, theirs, 1e-4)
