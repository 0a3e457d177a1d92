"""Deliberative explanations' class and difficulty maps, and the layer engine under them.

References: closed forms on a linear head, Captum's LayerIntegratedGradients, explicit Hessians
(``torch.autograd.functional.hessian``) and finite differences of gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from roar.attribution.gradcam import resolve_layer
from roar.attribution.layer import layer_gradients, layer_path_gradients, layer_quadratic
from roar.core.errors import RoarError
from roar.insecurity.maps import SCORES, deliberation_maps, hesitancy, normalised_entropy, predictor_score
from roar.models.base import Classifier
from roar.models.resnet8 import ResNet8

# torch.func's jvp scripts its decompositions on first use; the deprecation is torch's own.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: see ``one_thread`` in conftest."""


def linear_model(k: int = 4, classes: int = 6) -> nn.Sequential:
    """conv1×1 → ReLU (the layer) → global average pool → linear: gradients in closed form."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, k, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(k, classes)
    ).double()


def conv_model(head=nn.Softplus) -> nn.Sequential:
    """conv3×3 → ReLU (the layer, index 1) → conv3×3 → nonlinearity → pool → linear: a curved head
    in which neighbouring locations interact."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        head(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 7),
    ).double()


class Residual(nn.Module):
    """A branch around the layer (``conv``): the network above it also sees the layer's input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.stem, self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()
        self.fc = nn.Linear(4, 7)

    def forward(self, x):
        stem = self.stem(x)
        return self.fc(self.head(self.conv(stem) + stem).mean(dim=(2, 3)))


class Reshaping(Residual):
    """No branch around the layer, but logits reshaped to the *input's* batch size: the network above
    the layer cannot run on more path points than images, and must not silently try."""

    def forward(self, x):
        return self.fc(self.head(self.conv(self.stem(x))).mean(dim=(2, 3))).view(len(x), -1)


def images(n: int = 3, size: int = 5, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_linear_head_closed_form():
    model, x = linear_model(), images(size=4)
    conv, fc = model[0], model[4]
    features = torch.relu(torch.einsum("kc,bchw->bkhw", conv.weight[:, :, 0, 0], x) + conv.bias.view(1, -1, 1, 1))
    logits = fc(features.mean(dim=(2, 3)))
    hw, w = 16, fc.weight.detach()
    p = logits.softmax(1)
    # ∂y_c/∂F_k(i, j) = W_ck / hw; softmax: ∂p_m/∂y = p_m (e_m − p); entropy: ∂H/∂y_j = −p_j (log p_j + H)
    m = p.argmax(1)
    d_cs = -p.gather(1, m[:, None]) * (nn.functional.one_hot(m, 6) - p)
    entropy = -(p * p.log()).sum(1, keepdim=True)
    d_entropy = -p * (p.log() + entropy) / math.log(6)
    top = logits.topk(5, dim=1).indices

    maps = deliberation_maps(model, x, model[1], SCORES, variants=("gradient", "ig"), ig_steps=4)
    assert torch.equal(maps.top, top) and torch.allclose(maps.logits, logits)
    expected = torch.einsum("bkhw,btk->bthw", features, w[top] / hw).clamp(min=0)
    assert expected.max() > 0 and (expected == 0).any()  # both sides of the clip are exercised
    torch.testing.assert_close(maps.class_maps["gradient"], expected)
    for name, d_y in (("cs", d_cs), ("entropy", d_entropy)):
        grad = (d_y @ w / hw).clamp(min=0)  # [B, K]: the same at every location
        torch.testing.assert_close(maps.difficulty[name, "gradient"], torch.einsum("bkhw,bk->bhw", features, grad))
    torch.testing.assert_close(maps.scores["cs"], 1 - p.amax(1))
    torch.testing.assert_close(maps.scores["entropy"], entropy.squeeze(1) / math.log(6))
    # A linear head has a constant gradient, so IG is (F − F0)·W/hw; F0 = ReLU(bias) for a black image.
    delta = features - torch.relu(conv.bias).view(1, -1, 1, 1)
    torch.testing.assert_close(maps.class_maps["ig"], torch.einsum("bkhw,btk->bthw", delta, w[top] / hw).clamp(min=0))


@pytest.mark.parametrize("kind", ["sequential", "residual", "reshaping"])
def test_ig_matches_captum(kind):
    """Layer IG as Captum computes it, also where the path points cannot share one pass below the layer."""
    captum = pytest.importorskip("captum.attr")
    model = {"sequential": conv_model, "residual": Residual, "reshaping": Reshaping}[kind]().double()
    layer = model[1] if kind == "sequential" else model.conv
    x, steps = images(n=3), 12
    maps = deliberation_maps(model, x, layer, {"cs": hesitancy}, variants=("ig",), top=3, ig_steps=steps, max_batch=5)
    lig = captum.LayerIntegratedGradients(model, layer)
    black = torch.zeros_like(x)
    for t in range(3):
        reference = lig.attribute(x, baselines=black, target=maps.top[:, t], n_steps=steps, method="gausslegendre")
        assert reference.sum(1).min() < 0  # the clip matters
        torch.testing.assert_close(maps.class_maps["ig"][:, t], reference.sum(1).clamp(min=0), rtol=1e-6, atol=1e-9)
    # The difficulty score's path gradients, against Captum on the score as the model's output.
    features, base, mean_grads = layer_path_gradients(
        model, x, layer, hesitancy, baseline_images=black, steps=steps, max_batch=7
    )
    reference = captum.LayerIntegratedGradients(lambda v: hesitancy(model(v)), layer).attribute(
        x, baselines=black, n_steps=steps, method="gausslegendre"
    )
    torch.testing.assert_close((features - base) * mean_grads[:, 0], reference, rtol=1e-6, atol=1e-9)
    expected = ((features - base) * mean_grads[:, 0].clamp(min=0)).sum(1).clamp(min=0)
    torch.testing.assert_close(maps.difficulty["cs", "ig"], expected)


def test_ig_completeness():
    model, x = conv_model(nn.Tanh), images(n=4)
    top = model(x).topk(3, dim=1).indices
    features, base, mean_grads = layer_path_gradients(
        model, x, model[1], None, baseline_images=torch.zeros_like(x), steps=50, targets=top, max_batch=16
    )
    total = ((features - base).unsqueeze(1) * mean_grads).sum(dim=(2, 3, 4))  # [B, 3], unclipped
    expected = model(x).gather(1, top) - model(torch.zeros_like(x)).gather(1, top)
    assert expected.abs().min() > 1e-3
    torch.testing.assert_close(total, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("score", [hesitancy, normalised_entropy])
def test_quadratic_matches_full_hessian(score):
    torch.manual_seed(4)
    head = [nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)]
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), *head).double()
    x = images(n=3, size=4, seed=5)
    q = layer_quadratic(model, x, model[1], score)
    features = torch.relu(model[0](x)).detach()
    upper = model[2:]
    for b in range(len(x)):
        hessian = torch.autograd.functional.hessian(lambda f: score(upper(f[None]), f[None])[0], features[b])
        hessian = hessian.reshape(3, 16, 3, 16)
        f = features[b].reshape(3, 16)
        expected = torch.einsum("kp,kplp,lp->p", f, hessian, f).reshape(4, 4)
        assert expected.abs().max() > 1e-5 and (expected < 0).any() and (expected > 0).any()
        torch.testing.assert_close(q[b], expected, rtol=1e-9, atol=1e-12)
    maps = deliberation_maps(model, x, model[1], {"s": score}, variants=("gradient", "2ndg"), top=3)
    torch.testing.assert_close(maps.difficulty["s", "2ndg"], maps.difficulty["s", "gradient"] + 0.5 * q.abs())
    assert maps.class_maps["2ndg"] is maps.class_maps["gradient"]


def assert_same_maps(a, b, rows=slice(None)):
    assert torch.equal(a.top, b.top[rows])
    torch.testing.assert_close(a.logits, b.logits[rows])
    assert list(a.class_maps) == list(b.class_maps) and list(a.difficulty) == list(b.difficulty)
    for key in a.class_maps:
        torch.testing.assert_close(a.class_maps[key], b.class_maps[key][rows], rtol=1e-9, atol=1e-12)
    for key in a.difficulty:
        torch.testing.assert_close(a.difficulty[key], b.difficulty[key][rows], rtol=1e-9, atol=1e-12)
    for key in a.scores:
        torch.testing.assert_close(a.scores[key], b.scores[key][rows])


def test_batch_independence_and_chunking():
    model, x = conv_model(), images(n=4)
    run = {"layer": model[1], "scores": SCORES, "top": 4, "ig_steps": 5}
    whole = deliberation_maps(model, x, **run)
    assert whole.class_maps["2ndg"] is whole.class_maps["gradient"]
    # max_batch 3 with 5 steps: IG chunks that straddle two images, and an uneven last chunk of images.
    for max_batch in (1, 3):
        assert_same_maps(deliberation_maps(model, x, **run, max_batch=max_batch), whole)
    assert_same_maps(deliberation_maps(model, x[2:3], **run), whole, slice(2, 3))
    # Hessian-vector products in chunks of locations (one at a time) give the same q.
    q = layer_quadratic(model, x, model[1], hesitancy)
    torch.testing.assert_close(layer_quadratic(model, x, model[1], hesitancy, max_elements=1), q)
    torch.testing.assert_close(layer_quadratic(model, x, model[1], hesitancy, max_batch=3), q)


def test_resnet8_layer3():
    torch.manual_seed(0)
    model = Classifier(ResNet8(widths=(8, 8, 16)), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).eval().double()
    for module in model.modules():  # BatchNorm statistics as after training, not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    x = images(n=2, size=32, seed=6)
    name, layer = resolve_layer(model, "layer3")
    assert name == "net.layer3"
    hp = nn.Sequential(nn.Conv2d(16, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Sigmoid()).double()
    scores = {**SCORES, "hp": predictor_score(hp)}
    maps = deliberation_maps(model, x, "layer3", scores, ig_steps=4)
    assert maps.top.shape == (2, 5) and maps.top.dtype == torch.int64 and maps.logits.shape == (2, 10)
    assert list(maps.class_maps) == ["gradient", "ig", "2ndg"]
    assert set(maps.difficulty) == {(s, v) for s in scores for v in ("gradient", "ig", "2ndg")}
    for m in [*maps.class_maps.values(), *maps.difficulty.values()]:
        assert m.shape[-2:] == (8, 8) and torch.isfinite(m).all() and (m >= 0).all()
    assert all(m.shape == (2, 5, 8, 8) for m in maps.class_maps.values())
    assert all(m.shape == (2, 8, 8) for m in maps.difficulty.values())
    assert all(v.shape == (2,) for v in maps.scores.values()) and maps.class_maps["gradient"].max() > 0
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again afterwards
    # q through the hooked ResNet block inside torch.func, for a score that reaches the features both
    # through the network and directly (hp), against central differences of an explicit upper network.
    both = lambda logits, f: hesitancy(logits) + scores["hp"](logits, f)  # noqa: E731
    q = layer_quadratic(model, x, layer, both)
    features, _ = layer_gradients(model, x, layer, both)

    def grad_at(f):
        f = f.clone().requires_grad_(True)
        return torch.autograd.grad(both(model.net.fc(f.mean(dim=(2, 3))), f).sum(), f)[0]

    eps = 1e-4
    for i, j in [(0, 0), (3, 6), (7, 2)]:
        tangent = torch.zeros_like(features)
        tangent[:, :, i, j] = features[:, :, i, j]
        diff = (grad_at(features + eps * tangent) - grad_at(features - eps * tangent)) / (2 * eps)
        expected = (diff * tangent).sum(dim=(1, 2, 3))
        assert expected.abs().min() > 1e-8
        torch.testing.assert_close(q[:, i, j], expected, rtol=1e-5, atol=1e-12)


def test_user_errors():
    model, x = conv_model(), images(n=2)
    with pytest.raises(RoarError, match="unknown variants"):
        deliberation_maps(model, x, model[1], SCORES, variants=("hessian",))
    with pytest.raises(RoarError, match="exceeds the model's 7 classes"):
        deliberation_maps(model, x, model[1], SCORES, top=8)
    with pytest.raises(RoarError, match="one value per image"):
        deliberation_maps(model, x, model[1], {"bad": lambda logits, f: logits}, variants=("gradient",))
    with pytest.raises(RoarError, match="single score"):
        layer_quadratic(model, x, model[1], lambda logits, f: logits[:, :2])
    with pytest.raises(RoarError, match="unknown rule"):
        layer_path_gradients(model, x, model[1], hesitancy, baseline_images=x, rule="simpson")
