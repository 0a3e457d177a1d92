"""Training levers and named recipes: weight EMA and Lookahead against hand-written references,
whitening filters that whiten, exact flips (given, alternating, test-time), BatchNorm learning-rate
groups kept through the schedule, recipes merged under explicit keys, and a fast-recipe run with
EMA and Lookahead that resumes bit for bit."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import roar.training.trainer as trainer
from roar.config import dump_config, load_config
from roar.core.errors import RoarError
from roar.models import MODELS, Classifier, build_model
from roar.training.augment import flip_choices, random_crop_flip
from roar.training.averaging import Averages, Lookahead, WeightEMA
from roar.training.checkpoint import load_checkpoint
from roar.training.config import TrainingConfig
from roar.training.recipes import RECIPES, apply_recipe
from roar.training.sources import InMemorySource
from roar.training.whitening import first_conv, whiten_first_conv, whitening_filters

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


# ---------------------------------------------------------------- shared tiny pieces


def training(*overrides: str):
    """A validated training section from ``training.*`` overrides (on the CPU, no loader workers)."""
    return load_config(None, [*(f"training.{o}" for o in overrides), "training.num_workers=0"]).training


def image_source(n: int = 64, channels: int = 3, size: int = 8, seed: int = 0, classes: int = 10) -> InMemorySource:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    return InMemorySource(images, labels, CPU)


def resnet8(widths=(4, 4, 4), channels: int = 3, size: int = 8, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    cfg = MODELS.config_class("resnet8")(widths=list(widths))
    return build_model(cfg, 10, (channels, size, size), (0.5,) * channels, (0.25,) * channels)


def mlp(channels: int = 1, size: int = 4, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    cfg = MODELS.config_class("mlp")(hidden=[8])
    return build_model(cfg, 10, (channels, size, size), (0.5,) * channels, (0.25,) * channels)


def small_net(seed: int = 0) -> nn.Module:
    """Parameters, float BatchNorm statistics and an integer buffer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


@torch.no_grad()
def simulate_step(net: nn.Module, g: torch.Generator, t: int) -> None:
    """What an optimiser step and a BatchNorm forward would do: new weights and statistics."""
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=g))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(10 * t)


def assert_same(a, b, where: str = "") -> None:
    """Recursive bit-for-bit equality of checkpoint contents (tensors, dicts, lists, scalars)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------- weight EMA


def warmup_decays(decay: float, steps: int) -> list[float]:
    return [min(decay, (1 + t) / (10 + t)) for t in range(1, steps + 1)]


def test_ema_decay_schedule_is_the_warm_up_then_the_cap():
    d = warmup_decays(0.5, 10)
    assert d[0] == pytest.approx(2 / 11) and d[1] == pytest.approx(3 / 12) and d[6] == pytest.approx(8 / 17)
    assert d[7:] == [0.5, 0.5, 0.5]  # (1 + t) / (10 + t) reaches 0.5 at t = 8


def test_ema_of_constant_weights_decays_geometrically_from_the_initial_ones():
    """Fixed weights w after w0: average_T = w + (prod d_t) (w0 - w), d_t = min(decay, (1+t)/(10+t))."""
    net = small_net()
    w0 = float_state(net)
    ema = WeightEMA(net, decay=0.5)
    simulate_step(net, torch.Generator().manual_seed(1), t=3)
    w = float_state(net)
    for _ in range(12):
        ema.update(net)
    factor = torch.tensor(warmup_decays(0.5, 12), dtype=torch.float64).prod().item()
    got = ema.model.state_dict()
    for k in w:
        torch.testing.assert_close(got[k], w[k] + factor * (w0[k] - w[k]), rtol=1e-5, atol=1e-6)
    assert ema.steps == 12
    assert got["1.num_batches_tracked"].item() == 30  # integer buffers are copied, not averaged
    assert got["1.num_batches_tracked"].dtype == torch.int64


def test_ema_matches_a_hand_written_recurrence_and_leaves_the_network_alone():
    net = small_net()
    reference = float_state(net)
    ema = WeightEMA(net, decay=0.6)
    g = torch.Generator().manual_seed(2)
    for t, d in enumerate(warmup_decays(0.6, 15), start=1):
        simulate_step(net, g, t)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        ema.update(net)
        assert_same(net.state_dict(), before, "the trained network must not change")
        reference = {k: d * reference[k] + (1 - d) * net.state_dict()[k] for k in reference}
        for k, v in reference.items():
            torch.testing.assert_close(ema.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
        assert ema.model.state_dict()["1.num_batches_tracked"].item() == 10 * t
    # The average is a separate, frozen copy: no shared storage, no gradients.
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in net.parameters())
    ptrs = {p.data_ptr() for p in net.parameters()}
    assert not any(p.data_ptr() in ptrs for p in ema.model.parameters())


def test_ema_state_round_trip_continues_identically():
    net = small_net()
    ema = WeightEMA(net, decay=0.7)
    g = torch.Generator().manual_seed(3)
    for t in range(1, 5):
        simulate_step(net, g, t)
        ema.update(net)
    saved = ema.state_dict()
    restored = WeightEMA(small_net(seed=9), decay=0.7)  # other weights, step count 0
    restored.load_state_dict(saved)
    assert restored.steps == 4
    assert_same(restored.model.state_dict(), ema.model.state_dict())
    for t in range(5, 9):  # the restored step count gives the same warm-up decays from here on
        simulate_step(net, g, t)
        ema.update(net)
        restored.update(net)
    assert_same(restored.model.state_dict(), ema.model.state_dict())


# ---------------------------------------------------------------- Lookahead


def test_lookahead_matches_a_hand_written_reference():
    every, alpha = 3, 0.25
    net = small_net()
    slow = [p.detach().clone() for p in net.parameters()]
    la = Lookahead(net, every, alpha)
    g = torch.Generator().manual_seed(4)
    for t in range(1, 8):
        simulate_step(net, g, t)
        fast = [p.detach().clone() for p in net.parameters()]
        stats = net[1].running_mean.clone()
        la.update(net)
        if t % every == 0:
            slow = [s + alpha * (f - s) for s, f in zip(slow, fast)]
            expected = slow
        else:
            expected = fast
        for p, e in zip(net.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
        for s, e in zip(la.slow, slow):
            torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-7)
        assert torch.equal(net[1].running_mean, stats), "Lookahead leaves the BatchNorm statistics alone"
        assert la.steps == t
    # Step 7 is one past a Lookahead step: finish takes the pending step.
    fast = [p.detach().clone() for p in net.parameters()]
    la.finish(net)
    for p, s, f in zip(net.parameters(), slow, fast):
        torch.testing.assert_close(p.detach(), s + alpha * (f - s), rtol=1e-6, atol=1e-7)
    for s, p in zip(la.slow, net.parameters()):
        assert torch.equal(s, p.detach())


def test_lookahead_state_is_a_copy_and_round_trips():
    net = small_net()
    la = Lookahead(net, 2, 0.5)
    g = torch.Generator().manual_seed(5)
    for t in range(1, 4):
        simulate_step(net, g, t)
        la.update(net)
    saved = la.state_dict()
    frozen = [t.clone() for t in saved["slow"]]
    other = Lookahead(small_net(seed=7), 2, 0.5)
    other.load_state_dict(saved)
    assert other.steps == 3 and all(torch.equal(a, b) for a, b in zip(other.slow, la.slow))
    for t in range(4, 7):
        simulate_step(net, g, t)
        la.update(net)
    assert all(torch.equal(a, b) for a, b in zip(saved["slow"], frozen)), "state_dict must not alias the slow weights"


# ---------------------------------------------------------------- Averages


def test_averages_update_lookahead_first_then_ema_of_the_result():
    cfg = training("ema=0.5", "lookahead={every: 1, alpha: 0.5}")
    net = small_net()
    w0 = float_state(net)
    averages = Averages(net, cfg)
    simulate_step(net, torch.Generator().manual_seed(6), 1)
    w1 = {k: v.clone() for k, v in net.state_dict().items()}
    averages.update(net)
    d = 2 / 11
    for name, p in net.named_parameters():
        mid = (w0[name] + w1[name]) / 2  # Lookahead (every 1, alpha 1/2) moved the fast weights half way back
        torch.testing.assert_close(p.detach(), mid)
        torch.testing.assert_close(averages.ema.model.get_parameter(name), d * w0[name] + (1 - d) * mid)
    assert averages.evaluated(net) is averages.ema.model
    assert set(averages.state_dict()) == {"ema", "lookahead"}


def test_averages_finish_takes_only_a_pending_lookahead_step_and_off_is_a_no_op():
    cfg = training("lookahead={every: 2, alpha: 0.5}")
    net = small_net()
    averages = Averages(net, cfg)
    assert averages.ema is None and averages.evaluated(net) is net
    g = torch.Generator().manual_seed(7)
    for t in (1, 2):
        simulate_step(net, g, t)
        averages.update(net)
    at_sync = [p.detach().clone() for p in net.parameters()]
    averages.finish(net)
    assert all(torch.equal(p.detach(), a) for p, a in zip(net.parameters(), at_sync))
    simulate_step(net, g, 3)
    averages.update(net)
    fast = [p.detach().clone() for p in net.parameters()]
    averages.finish(net)
    for p, s, f in zip(net.parameters(), at_sync, fast):
        torch.testing.assert_close(p.detach(), (s + f) / 2)

    off = Averages(net, training())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    off.update(net)
    off.finish(net)
    off.load_state_dict({})
    assert off.state_dict() == {} and off.evaluated(net) is net
    assert_same(net.state_dict(), before)


# ---------------------------------------------------------------- whitening


def patch_matrix(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """[N·positions, C·kh·kw] patches by plain slicing, ordered (channel, row, column)."""
    n, c, h, w = x.shape
    cols = [x[:, ch, dy : dy + h - kh + 1, dx : dx + w - kw + 1].reshape(-1) for ch in range(c) for dy in range(kh)
            for dx in range(kw)]  # fmt: skip
    return torch.stack(cols, 1)


def correlated_images(n=48, size=7, seed=0, scale=3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, size, size, generator=g, dtype=torch.float64)
    smooth = F.avg_pool2d(F.pad(base, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # neighbours correlate
    other = 0.8 * smooth + 0.3 * torch.randn(n, 1, size, size, generator=g, dtype=torch.float64)
    return scale * torch.cat([smooth, other], 1) + 0.7  # channels correlate too; a mean that must not matter


def response_covariance(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    r = F.conv2d(x.double(), filters.double()).transpose(0, 1).reshape(len(filters), -1)
    r = r - r.mean(1, keepdim=True)
    return r @ r.T / r.shape[1]


@pytest.mark.parametrize("count", [8, 16])
def test_whitening_filters_decorrelate_the_patches_of_the_top_directions(count):
    x = correlated_images()
    eps = 5e-4
    filters = whitening_filters(x, (2, 2), count)
    assert filters.shape == (count, 2, 2, 2) and filters.dtype == torch.float64
    half = count // 2
    assert torch.equal(filters[half:], -filters[:half])
    patches = patch_matrix(x, 2, 2)
    lam = torch.linalg.eigvalsh(torch.cov(patches.T, correction=0)).flip(0)[:half]  # largest first
    cov = response_covariance(x, filters[:half])  # the filters as a convolution applies them
    torch.testing.assert_close(cov, torch.diag(lam / (lam + eps)), rtol=1e-7, atol=1e-9)
    assert (lam > 100 * eps).all()
    torch.testing.assert_close(cov, torch.eye(half, dtype=torch.float64), rtol=0, atol=0.01)
    # The top directions, in order: a filter's squared norm is 1 / (lambda + eps).
    norms = filters[:half].flatten(1).pow(2).sum(1)
    torch.testing.assert_close(norms, 1 / (lam + eps))


def test_whitening_filters_handle_directions_without_variance():
    x = correlated_images()
    x[:, 1] = 0.3  # a constant channel: four patch directions with zero variance
    eps = 5e-4
    filters = whitening_filters(x, (2, 2), 16, eps=eps)
    assert torch.isfinite(filters).all()
    lam = torch.linalg.eigvalsh(torch.cov(patch_matrix(x, 2, 2).T, correction=0)).flip(0).clamp_min(0)
    cov = response_covariance(x, filters[:8])
    torch.testing.assert_close(cov, torch.diag(lam / (lam + eps)), rtol=1e-6, atol=1e-7)
    assert cov.diagonal()[4:].abs().max() < 1e-9  # the constant channel's directions respond with nothing


def test_whiten_first_conv_sets_2x_patch_dim_channels_and_keeps_the_rest():
    torch.manual_seed(0)
    x = correlated_images()[:, :1].float()
    net = nn.Sequential(nn.Conv2d(1, 11, 2), nn.ReLU(), nn.Conv2d(11, 4, 1))  # patch dim 4: 8 of 11 channels
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert whiten_first_conv(net, x) == 8
    conv = net[0]
    torch.testing.assert_close(conv.weight[:8].double(), whitening_filters(x, (2, 2), 8), rtol=1e-6, atol=1e-6)
    assert torch.equal(conv.weight[8:], before["0.weight"][8:])
    assert torch.equal(conv.bias[:8], torch.zeros(8)) and torch.equal(conv.bias[8:], before["0.bias"][8:])
    assert torch.equal(net[2].weight, before["2.weight"]), "only the first convolution changes"
    cov = response_covariance(x, conv.weight[:4].detach())
    torch.testing.assert_close(cov, torch.eye(4, dtype=torch.float64), rtol=0, atol=0.02)


def test_whiten_first_conv_odd_and_tiny_widths():
    x = correlated_images().float()  # 2 channels, 3x3 kernels: patch dim 18
    net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1, bias=False))
    init = net[0].weight.detach().clone()
    assert whiten_first_conv(net, x) == 4  # an even number: each direction with its negative
    assert torch.equal(net[0].weight[4], init[4])
    assert torch.equal(net[0].weight[2:4], -net[0].weight[:2])
    single = nn.Conv2d(2, 1, 3)
    init = single.weight.detach().clone()
    assert whiten_first_conv(single, x) == 0 and torch.equal(single.weight, init)


def test_first_conv_is_the_first_ungrouped_conv_over_the_input_channels():
    depthwise = nn.Conv2d(3, 6, 3, groups=3)
    first = nn.Conv2d(3, 4, 3)
    later = nn.Conv2d(3, 4, 3)
    net = nn.Sequential(depthwise, nn.Conv2d(6, 3, 1), first, later)
    assert first_conv(net, 3) is first
    kept = later.weight.detach().clone()
    whiten_first_conv(net, torch.rand(8, 3, 6, 6))
    assert torch.equal(later.weight, kept)

    with pytest.raises(RoarError, match=r"whiten_init.*3 input channels"):
        whiten_first_conv(nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.Conv2d(6, 4, 3)), torch.rand(2, 3, 6, 6))
    with pytest.raises(RoarError, match=r"whiten_init.*1 input channels"):
        whiten_first_conv(mlp().net, torch.rand(2, 1, 4, 4))


# ---------------------------------------------------------------- augmentation: given flips


def test_a_flip_mask_mirrors_exactly_the_chosen_images_and_their_aligned_tensors():
    images = torch.rand(6, 3, 5, 5)
    masks = torch.rand(6, 5, 5)
    choice = torch.tensor([True, False, False, True, True, False])
    out, out_masks = random_crop_flip(images, 0, choice, torch.Generator().manual_seed(0), masks)
    for i in range(6):
        want = images[i].flip(-1) if choice[i] else images[i]
        assert torch.equal(out[i], want) and torch.equal(out_masks[i], masks[i].flip(-1) if choice[i] else masks[i])
    (none,) = random_crop_flip(images, 0, torch.zeros(6, dtype=torch.bool), torch.Generator())
    (every,) = random_crop_flip(images, 0, torch.ones(6, dtype=torch.bool), torch.Generator())
    assert torch.equal(none, images) and torch.equal(every, images.flip(-1))


def test_a_flip_mask_composes_with_the_same_random_crop():
    images = torch.rand(16, 2, 6, 6)
    choice = torch.rand(16, generator=torch.Generator().manual_seed(1)) < 0.5
    (cropped,) = random_crop_flip(images, 2, False, torch.Generator().manual_seed(5))
    (out,) = random_crop_flip(images, 2, choice, torch.Generator().manual_seed(5))
    assert not torch.equal(cropped, images)
    assert torch.equal(out, torch.where(choice.view(-1, 1, 1, 1), cropped.flip(-1), cropped))


# ---------------------------------------------------------------- evaluation with flip TTA


def test_flip_tta_averages_the_logits_of_an_image_and_its_mirror():
    torch.manual_seed(0)
    linear = nn.Linear(2 * 3 * 4, 5)  # not flip-invariant: each pixel has its own weights
    model = Classifier(nn.Sequential(nn.Flatten(), linear), (0.0, 0.0), (1.0, 1.0))
    source = image_source(n=40, channels=2, size=4, classes=5)
    source.images = source.images[..., :3, :]  # [N, 2, 3, 4]: rows and columns differ
    x = source.images.float() / 255
    w, b = linear.weight.detach(), linear.bias.detach()
    plain = x.flatten(1) @ w.T + b
    mirrored = x.flip(-1).flatten(1) @ w.T + b
    for tta, logits in (("none", plain), ("flip", (plain + mirrored) / 2)):
        metrics, predictions = trainer.evaluate(model, source, 16, CPU, amp=False, channels_last=False, tta=tta)
        assert torch.equal(predictions, logits.argmax(1))
        assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == source.labels).float().mean().item())
        assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, source.labels).item(), rel=1e-5)
    assert not torch.equal(plain.argmax(1), ((plain + mirrored) / 2).argmax(1)), "the test must tell them apart"


# ---------------------------------------------------------------- alternating flips and evaluation interval


def test_flip_choices_are_a_fixed_coin_per_example():
    a = flip_choices(1000, 3)
    assert a.dtype == torch.bool and a.shape == (1000,)
    assert torch.equal(a, flip_choices(1000, 3))
    assert not torch.equal(a, flip_choices(1000, 4))
    assert 400 < int(a.sum()) < 600


def record_flips(monkeypatch) -> list[tuple[torch.Tensor, object]]:
    """Replace the trainer's augmentation by one that records (example indices, flip argument)."""
    seen = []
    augment = trainer.random_crop_flip

    def recording(images, padding, flip, generator, *aligned):
        index = (images[:, 0, 0, -1] * 255).round().long()  # the images encode their index
        seen.append((index, flip.clone() if isinstance(flip, torch.Tensor) else flip))
        return augment(images, padding, flip, generator, *aligned)

    monkeypatch.setattr(trainer, "random_crop_flip", recording)
    return seen


def indexed_source(n: int = 32) -> InMemorySource:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    images[:, :, :, 0] = 200  # not mirror-symmetric (the index is in the last column)
    return InMemorySource(images, torch.arange(n) % 10, CPU)


def test_alternating_flips_mirror_each_example_on_every_other_epoch(monkeypatch, tmp_path):
    seen = record_flips(monkeypatch)
    source, seed = indexed_source(), 11
    cfg = training("epochs=3", "batch_size=8", "augment={crop_padding: 0, flip: alternating}", "eval_every=2")
    trainer.fit(mlp(), source, source, cfg, tmp_path, seed, CPU)
    flips = flip_choices(len(source), seed)
    assert 0 < int(flips.sum()) < len(source)
    assert len(seen) == 3 * 4
    for step, (index, flip) in enumerate(seen):
        epoch = step // 4 + 1
        assert isinstance(flip, torch.Tensor) and flip.dtype == torch.bool
        want = flips[index] if epoch % 2 == 1 else ~flips[index]
        assert torch.equal(flip, want), f"epoch {epoch}"
    for epoch in (1, 2, 3):
        order = torch.cat([index for index, _ in seen[4 * (epoch - 1) : 4 * epoch]])
        assert sorted(order.tolist()) == list(range(32)), "every example once per epoch"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert ["test_accuracy" in r for r in rows] == [False, True, True]  # eval_every 2, and the last epoch


@pytest.mark.parametrize("flip", [True, False])
def test_plain_flip_settings_are_passed_through(monkeypatch, tmp_path, flip):
    seen = record_flips(monkeypatch)
    cfg = training("epochs=1", "batch_size=8", f"augment={{crop_padding: 0, flip: {str(flip).lower()}}}")
    trainer.fit(mlp(), indexed_source(), indexed_source(), cfg, tmp_path, 0, CPU)
    assert len(seen) == 4 and all(f is flip for _, f in seen)


def test_fit_reports_the_flip_tta_accuracy_of_the_returned_model(tmp_path):
    source = image_source(n=32, channels=1, size=4)
    cfg = training("epochs=1", "batch_size=8", "tta=flip")
    model = mlp()
    summary, predictions = trainer.fit(model, source, source, cfg, tmp_path, 0, CPU)
    flip, flip_pred = trainer.evaluate(model, source, 1024, CPU, amp=False, tta="flip")
    plain, _ = trainer.evaluate(model, source, 1024, CPU, amp=False)
    assert summary["test_loss"] == flip["loss"] and torch.equal(predictions, flip_pred)
    assert summary["test_loss"] != plain["loss"]


# ---------------------------------------------------------------- optimiser groups and schedules


def norm_params(model: nn.Module) -> set[int]:
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    return {id(p) for m in model.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)}


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_bn_lr_scale_puts_normalisation_parameters_in_a_scaled_group(name):
    model = resnet8()
    cfg = training(f"optimizer={{name: {name}, lr: 0.04}}", "bn_lr_scale=0.25")
    opt = trainer.make_optimizer(model, cfg)
    assert type(opt) is {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    main, norm = opt.param_groups
    norms = norm_params(model)
    assert len(norms) == 2 * sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    assert {id(p) for p in norm["params"]} == norms
    assert {id(p) for p in main["params"]} == {id(p) for p in model.parameters()} - norms
    assert main["lr"] == 0.04 and norm["lr"] == pytest.approx(0.01)
    assert main["weight_decay"] == norm["weight_decay"] == cfg.optimizer.weight_decay

    single = trainer.make_optimizer(model, training(f"optimizer={{name: {name}, lr: 0.04}}"))
    assert len(single.param_groups) == 1 and len(single.param_groups[0]["params"]) == len(list(model.parameters()))


def test_bn_lr_scale_covers_group_and_layer_norm_and_skips_frozen_or_missing():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 2))
    net[0].bias.requires_grad_(False)
    opt = trainer.make_optimizer(net, training("bn_lr_scale=2"))
    main, norm = opt.param_groups
    assert {id(p) for p in norm["params"]} == norm_params(net)
    assert {id(p) for p in main["params"]} == {id(net[0].weight), id(net[4].weight), id(net[4].bias)}
    plain = nn.Sequential(nn.Linear(3, 2))
    assert len(trainer.make_optimizer(plain, training("bn_lr_scale=2")).param_groups) == 1


@pytest.mark.parametrize("schedule", ["onecycle", "step", "cosine", "constant"])
def test_schedules_keep_the_ratio_of_the_two_groups(schedule):
    model = resnet8()
    section = f"schedule={{name: {schedule}, step_epochs: 1, warmup_fraction: 0.25}}"
    cfg = training("epochs=3", section, "optimizer.lr=0.05", "bn_lr_scale=3")
    opt = trainer.make_optimizer(model, cfg)
    steps_per_epoch = 4
    sched = trainer.make_scheduler(opt, cfg, steps_per_epoch)
    rates = []
    for _ in range(3 * steps_per_epoch):
        rates.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for main, norm in rates:
        assert norm == pytest.approx(3 * main, rel=1e-9)
    mains = [main for main, _ in rates]
    if schedule == "onecycle":
        # 12 steps, warm-up 0.25: the peak is step 0.25 * 12 - 1 = 2, from max / 25 (OneCycleLR's div_factor)
        assert mains[2] == pytest.approx(0.05) and mains[0] == pytest.approx(0.05 / 25)
        peak = mains.index(max(mains))
        assert mains[: peak + 1] == sorted(mains[: peak + 1]) and mains[peak:] == sorted(mains[peak:], reverse=True)
    elif schedule == "constant":
        assert mains == [0.05] * 12


# ---------------------------------------------------------------- prepare


def test_prepare_sets_batchnorm_momentum_and_whitens_the_stem_from_normalised_images():
    """The whitening sample: WHITEN_IMAGES training images drawn with a generator seeded by the run's seed,
    normalised as the model does; the global random stream is left alone."""
    model = resnet8(widths=(20, 4, 4), channels=1, size=4)  # patch dim 9: 18 of the stem's 20 channels
    n = trainer.WHITEN_IMAGES + 3
    source = image_source(n=n, channels=1, size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    trainer.prepare(model, source, training("bn_momentum=0.3", "whiten_init=true"), seed=5)
    assert torch.equal(torch.get_rng_state(), rng)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) >= 5 and all(m.momentum == 0.3 for m in bns)

    order = torch.randperm(n, generator=torch.Generator().manual_seed(5))[: trainer.WHITEN_IMAGES]
    images = (source.images[order].float() / 255 - 0.5) / 0.25
    stem = model.net.stem[0]
    torch.testing.assert_close(stem.weight[:18].double(), whitening_filters(images, (3, 3), 18), rtol=1e-6, atol=1e-5)
    assert torch.equal(stem.weight[18:], before["net.stem.0.weight"][18:])
    for k, v in model.state_dict().items():
        if k != "net.stem.0.weight":
            assert torch.equal(v, before[k]), k
    cov = response_covariance(images, stem.weight[:9].detach())
    torch.testing.assert_close(cov, torch.eye(9, dtype=torch.float64), rtol=0, atol=0.05)


def test_prepare_without_levers_changes_nothing_and_whitening_an_mlp_is_refused():
    model = resnet8()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.prepare(model, image_source(), training(), seed=0)
    assert_same(model.state_dict(), before)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(RoarError, match="whiten_init"):
        trainer.prepare(mlp(), image_source(channels=1, size=4), training("whiten_init=true"), seed=0)


# ---------------------------------------------------------------- fit with an EMA


def test_fit_with_ema_returns_the_average_of_the_step_by_step_weights(tmp_path):
    """The EMA does not steer training: a run without it, snapshotting every step, gives the
    trajectory from which the average is recomputed by hand."""
    source, test_source = image_source(n=64), image_source(n=24, seed=1)
    common = ["epochs=2", "batch_size=16", "optimizer.lr=0.01", "schedule={name: onecycle}", "augment.crop_padding=1"]
    plain_cfg = training(*common, "snapshots.every_steps=1")
    ema_cfg = training(*common, "ema=0.3")
    plain = resnet8()
    init = {k: v.clone() for k, v in plain.state_dict().items()}
    trainer.fit(plain, source, test_source, plain_cfg, tmp_path / "plain", 0, CPU)
    averaged = resnet8()
    summary, predictions = trainer.fit(averaged, source, test_source, ema_cfg, tmp_path / "ema", 0, CPU)

    snaps = sorted((tmp_path / "plain" / "snapshots").glob("step_*.pt"))
    assert len(snaps) == 8 and summary["steps"] == 8
    reference = {k: v.clone() for k, v in init.items() if v.is_floating_point()}
    for d, snap in zip(warmup_decays(0.3, 8), snaps):
        weights = load_checkpoint(snap)["model"]
        reference = {k: d * reference[k] + (1 - d) * weights[k] for k in reference}
    result = averaged.state_dict()
    for k, v in reference.items():
        torch.testing.assert_close(result[k], v, rtol=1e-5, atol=1e-6, msg=k)
    last = load_checkpoint(tmp_path / "ema" / "last.pt")
    fast = load_checkpoint(tmp_path / "plain" / "last.pt")["model"]
    assert_same(last["model"], fast, "the EMA must not change the trained weights")
    assert_same(result, last["averages"]["ema"]["model"])
    assert last["averages"]["ema"]["steps"] == 8
    assert not torch.equal(result["net.fc.weight"], fast["net.fc.weight"])
    for k, v in result.items():
        if not v.is_floating_point():
            assert torch.equal(v, fast[k]), k
    metrics, again = trainer.evaluate(averaged, test_source, 1024, CPU, amp=False)
    assert summary["test_accuracy"] == metrics["accuracy"] and summary["test_loss"] == metrics["loss"]
    assert torch.equal(predictions, again)


def test_fit_with_lookahead_ends_on_the_slow_weights(tmp_path):
    """4 steps with Lookahead every 3: the pending step is taken at the end, so the returned (and
    checkpointed) weights are the slow ones, one Lookahead step past the fast weights of step 4."""
    source = image_source(n=64)
    common = ["epochs=1", "batch_size=16", "optimizer.lr=0.01", "schedule={name: constant}"]
    model = resnet8()
    trainer.fit(model, source, source, training(*common, "lookahead={every: 3, alpha: 0.5}"), tmp_path / "la", 0, CPU)
    last = load_checkpoint(tmp_path / "la" / "last.pt")
    slow = last["averages"]["lookahead"]["slow"]
    assert last["averages"]["lookahead"]["steps"] == 4 and len(slow) == len(list(model.parameters()))
    for p, s in zip(model.parameters(), slow):
        assert torch.equal(p.detach(), s)
    assert_same(last["model"], model.state_dict())
    # Step 3 synced the fast weights to the slow ones, step 4 moved only the fast ones: the final step
    # lands half way between the slow weights of step 3 and the fast weights of step 4.
    steps = training(*common, "lookahead={every: 3, alpha: 0.5}", "snapshots.every_steps=1")
    trainer.fit(resnet8(), source, source, steps, tmp_path / "snaps", 0, CPU)
    at3, at4 = (load_checkpoint(tmp_path / "snaps" / "snapshots" / f"step_{i:07d}.pt")["model"] for i in (3, 4))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), (at3[name] + at4[name]) / 2, msg=name)


# ---------------------------------------------------------------- recipes


def flatten(section: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in section.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_validates_and_sets_its_values(name):
    cfg = load_config(None, [f"training.recipe={name}"])
    resolved = flatten(cfg.training.model_dump(mode="json"))
    assert resolved["recipe"] == name
    for key, value in flatten(RECIPES[name]).items():
        assert resolved[key] == value, key


def test_explicit_keys_win_and_nested_sections_merge_key_by_key():
    fast = RECIPES["fast"]
    defaults = load_config(None).training

    def preset(section: str, key: str):
        """The fast recipe's value, or the schema default where the recipe leaves the key alone."""
        return fast.get(section, {}).get(key, getattr(getattr(defaults, section), key))

    assert set(fast["optimizer"]) - {"lr"}, "the merge needs a preset optimizer key beside the overridden one"
    cfg = load_config(
        None, ["training.recipe=fast", "training.epochs=5", "training.optimizer.lr=0.5", "training.augment.flip=false"]
    ).training
    assert cfg.recipe == "fast" and cfg.epochs == 5 and fast["epochs"] != 5
    assert cfg.optimizer.lr == 0.5 and fast["optimizer"]["lr"] != 0.5
    for key in ("name", "weight_decay", "momentum", "nesterov"):
        assert getattr(cfg.optimizer, key) == preset("optimizer", key), key
    assert cfg.augment.flip is False and cfg.augment.crop_padding == preset("augment", "crop_padding")
    assert cfg.batch_size == fast["batch_size"] and cfg.schedule.name == preset("schedule", "name")
    assert defaults.recipe is None and defaults.batch_size == 256  # no recipe: the plain defaults


def test_the_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["training.recipe=fast", "training.epochs=5", "training.ema=0.9"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_unknown_recipe_names_the_key_and_suggests_the_closest():
    with pytest.raises(RoarError, match=r"training\.recipe: unknown recipe 'fsat' \(did you mean 'fast'\?\)"):
        load_config(None, ["training.recipe=fsat"])
    with pytest.raises(RoarError, match="recipe") as info:
        load_config(None, ["training.recipe=zzzz"])
    assert "did you mean" not in str(info.value) and "seed" in str(info.value)


def test_apply_recipe_copies_and_passes_through():
    assert apply_recipe({"epochs": 3}) == {"epochs": 3}
    assert apply_recipe({"recipe": None, "epochs": 3}) == {"recipe": None, "epochs": 3}
    assert apply_recipe("base") == "base"
    raw = {"recipe": "fast", "optimizer": {"lr": 0.5}}
    merged = apply_recipe(raw)
    assert raw == {"recipe": "fast", "optimizer": {"lr": 0.5}}
    pristine = copy.deepcopy(RECIPES)
    for section in merged.values():  # editing the result must not edit the presets
        if isinstance(section, dict):
            section["probe"] = 1
            for key in list(section):
                section[key] = "changed"
    assert pristine == RECIPES


# ---------------------------------------------------------------- resume with the fast recipe


@pytest.mark.parametrize(
    "extra", [[], ["augment={crop_padding: 1, flip: alternating}"]], ids=["recipe-augment", "alternating-crop"]
)
def test_fast_recipe_with_ema_and_lookahead_resumes_bit_for_bit(tmp_path, monkeypatch, extra):
    cfg = training(
        "recipe=fast",
        "epochs=2",
        "batch_size=16",  # 4 steps per epoch: Lookahead (every 3) is mid-cycle when epoch 1 ends
        "ema=0.8",
        "lookahead={every: 3, alpha: 0.5}",
        "bn_momentum=0.4",  # not in the state dict: a resume must set it again
        *extra,
    )
    assert cfg.whiten_init is RECIPES["fast"].get("whiten_init", False)
    source, test_source = image_source(n=64), image_source(n=24, seed=1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fingerprint = {"case": "resume"}
    save = trainer.save_atomic

    def save_and_keep_epoch_one(obj, path):
        save(obj, path)
        if Path(path).name == "last.pt" and obj["epoch"] == 1:  # what a kill after epoch 1 leaves
            resumed.mkdir()
            shutil.copy(path, resumed / "last.pt")
            shutil.copy(Path(path).parent / "metrics.jsonl", resumed / "metrics.jsonl")

    monkeypatch.setattr(trainer, "save_atomic", save_and_keep_epoch_one)
    a_model = resnet8(seed=0)
    a_summary, a_pred = trainer.fit(a_model, source, test_source, cfg, straight, 7, CPU, fingerprint=fingerprint)
    monkeypatch.setattr(trainer, "save_atomic", save)

    kept = load_checkpoint(resumed / "last.pt")
    assert kept["epoch"] == 1 and kept["averages"]["lookahead"]["steps"] == 4
    b_model = resnet8(seed=123)  # the weights must come from the checkpoint, not the fresh init
    b_summary, b_pred = trainer.fit(b_model, source, test_source, cfg, resumed, 7, CPU, fingerprint=fingerprint)

    assert_same(a_model.state_dict(), b_model.state_dict(), "returned (EMA) weights")
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    for key in ("model", "optimizer", "scheduler", "averages", "epoch", "step", "fingerprint"):
        assert_same(a[key], b[key], key)
    assert a["averages"]["ema"]["steps"] == a["averages"]["lookahead"]["steps"] == a["step"] == 8
    assert torch.equal(a_pred, b_pred)
    for key in ("test_accuracy", "test_loss", "steps", "epochs"):
        assert a_summary[key] == b_summary[key], key

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if "seconds" not in k} for x in lines]

    assert rows(straight) == rows(resumed) and [r["epoch"] for r in rows(resumed)] == [1, 2]


@pytest.mark.parametrize("total", [1, 2, 5, 10])
def test_onecycle_survives_a_warm_up_of_exactly_one_step(total):
    """0.2 x 5 steps is a warm-up of one step, where OneCycleLR would divide by zero."""
    net = nn.Linear(2, 2)
    cfg = TrainingConfig.model_validate({"epochs": total, "schedule": {"name": "onecycle", "warmup_fraction": 0.2}})
    optimizer = trainer.make_optimizer(net, cfg)
    scheduler = trainer.make_scheduler(optimizer, cfg, steps_per_epoch=1)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert all(0 < r <= cfg.optimizer.lr * (1 + 1e-9) for r in rates)
    assert rates[-1] < cfg.optimizer.lr or total == 1
