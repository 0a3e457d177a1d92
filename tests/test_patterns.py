"""PatternNet, PatternAttribution and PGIG: the estimators against closed forms, the PGIG paper's toy
problem, streaming and BatchNorm folding, the backward wiring through residual adds, refusals, and the
``roar patterns`` stage (reuse, recomputation, resumption) with ``roar extract`` end to end.

Captum has no PatternNet or PatternAttribution, so there is no reference implementation to compare with;
the closed forms and the wiring test (patterns set to the weights give back the plain gradient) stand in.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import run_copy, small_resnet8
from torch import nn

from roar.attribution import Context, create
from roar.attribution.engine import fold_batchnorm, input_gradients
from roar.attribution.pattern_graph import analyse, reconstruct
from roar.attribution.patterns import PatternEstimator, estimate_patterns, load_patterns, pattern_model
from roar.core.errors import RoarError
from roar.models.base import Classifier
from roar.models.mlp import MLP

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


# ---------------------------------------------------------------------------------------------- the PGIG toy


def saturated_model() -> nn.Module:
    """f(x) = 1 − ReLU(1 − wᵀx), w = (1, −1): a linear layer (−w, bias 1), a ReLU, a linear layer (−1, bias 1)."""
    hidden, out = nn.Linear(2, 1), nn.Linear(1, 1)
    with torch.no_grad():
        hidden.weight.copy_(torch.tensor([[-1.0, 1.0]]))
        hidden.bias.fill_(1.0)
        out.weight.fill_(-1.0)
        out.bias.fill_(1.0)
    return nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), out).eval()


def toy_data(n: int, seed: int, low: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x = z·(1, 0) + ε·(1, 1), z ~ U(low, 2), ε ~ N(0, 0.3²): inputs [n, 2, 1, 1], z and ε."""
    g = torch.Generator().manual_seed(seed)
    z = low + (2 - low) * torch.rand(n, generator=g)
    eps = 0.3 * torch.randn(n, generator=g)
    x = torch.stack([z + eps, eps], 1)
    return x.view(n, 2, 1, 1), z, eps


def test_the_pgig_toy_ig_credits_the_distractor_pa_is_zero_on_the_plateau_pgig_neither():
    model = saturated_model()
    x, z, _ = toy_data(20_000, seed=0)
    with torch.no_grad():
        assert torch.allclose(model(x).squeeze(1), z.clamp(max=1), atol=1e-5)  # f = min(z, 1): only z matters
    patterns = estimate_patterns(model, x, batch_size=4096)
    # The signal direction of the hidden unit is (1, 0) (up to sign): the distractor gets no pattern.
    a_plus = patterns.units[0].two_component[0]
    assert abs(a_plus[1]) < 0.02 and abs(abs(a_plus[0]) - 1) < 0.02, a_plus

    plateau, _, eps = toy_data(256, seed=1, low=1.2)  # every z > 1: f saturated
    targets = torch.zeros(len(plateau), dtype=torch.long)
    context = Context(patterns=patterns)
    ig = create("integrated_gradients", steps=64)(model, plateau, targets).flatten(1)
    pa = create("pattern_attribution")(model, plateau, targets, context=context).flatten(1)
    pgig = create("pgig", steps=64)(model, plateau, targets, context=context).flatten(1)

    # IG credits the second input, which carries only the distractor: ≈ −ε/z.
    assert ig[:, 1].abs().mean() > 0.1
    assert cosine(ig[:, 1:], -eps.view(-1, 1)).mean() > 0.99
    # PatternAttribution is the (pattern-)gradient at x, where the ReLU is closed: exactly zero.
    assert torch.equal(pa, torch.zeros_like(pa))
    # PGIG is neither zero nor on the distractor: |x₁|/z on the signal input, ~0 on the other.
    assert pgig[:, 0].abs().mean() > 0.5
    assert pgig[:, 1].abs().max() < 0.05 * pgig[:, 0].abs().mean()
    assert pgig[:, 1].abs().mean() < 0.1 * ig[:, 1].abs().mean()


# ---------------------------------------------------------------------------------------------- closed forms


def linear_problem(n: int = 4000, seed: int = 0):
    """A ReLU unit y = wᵀx + b whose filter w = (1, −1, 0, 0) cancels the distractor (1, 1, 0, 0) and picks up
    the signal along u = (1, 0, 0, 0); x = s·u + d·(1, 1, 0, 0) + small noise. float64 throughout."""
    g = torch.Generator().manual_seed(seed)
    u = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    v = torch.tensor([1.0, 1, 0, 0], dtype=torch.float64)
    s = torch.randn(n, 1, generator=g, dtype=torch.float64)
    d = 2 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x = s * u + d * v + 0.05 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    hidden, out = nn.Linear(4, 1), nn.Linear(1, 1)
    with torch.no_grad():
        hidden.weight.copy_(torch.tensor([[1.0, -1.0, 0.0, 0.0]]))
        hidden.bias.fill_(0.3)
        out.weight.fill_(2.0)
    model = nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), out).double().eval()
    return model, x.view(n, 4, 1, 1), u


def test_the_estimated_patterns_are_the_closed_forms_and_patternnet_finds_the_signal():
    model, images, u = linear_problem()
    patterns = estimate_patterns(model, images, batch_size=512)
    x = images.flatten(1).numpy()
    w = np.array([1.0, -1.0, 0, 0])
    y = x @ w + 0.3
    # Linear estimator: a = cov(x, y) / var(y).
    cov = np.cov(np.c_[x, y].T, bias=True)
    a = cov[:4, 4] / cov[4, 4]
    np.testing.assert_allclose(patterns.units[0].linear[0].numpy(), a, rtol=0, atol=1e-6)
    # Two-component estimator: a₊ = (E₊[xy] − E₊[x]E[y]) / wᵀ(E₊[xy] − E₊[x]E[y]).
    pos = y > 0
    num = (x[pos] * y[pos, None]).mean(0) - x[pos].mean(0) * y.mean()
    np.testing.assert_allclose(patterns.units[0].two_component[0].numpy(), num / (w @ num), rtol=0, atol=1e-6)
    np.testing.assert_allclose(patterns.units[0].positive.numpy(), [pos.mean()], rtol=0, atol=1e-12)
    # Both patterns point along the signal, which the weight does not (cos 0.71).
    assert cosine(patterns.units[0].linear, u.view(1, -1)) > 0.99
    assert cosine(patterns.units[0].two_component, u.view(1, -1)) > 0.99

    probe = images[:64][torch.from_numpy(y[:64] > 0)]  # inputs where the ReLU is open
    targets = torch.zeros(len(probe), dtype=torch.long)
    signal = create("pattern_net")(model, probe, targets, context=Context(patterns=patterns))
    gradient = create("gradient")(model, probe, targets)
    assert (cosine(signal, u.expand(len(probe), 4)) > 0.99).all()
    assert (cosine(gradient, u.expand(len(probe), 4)) < 0.75).all()


# ---------------------------------------------------------------------------------------------- streaming, folding


def models():
    torch.manual_seed(3)
    mlp = Classifier(MLP(3 * 8 * 8, 5, (12, 10)), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)).eval()
    return {"resnet8": small_resnet8(), "mlp": mlp}


@pytest.mark.parametrize("name", ["resnet8", "mlp"])
def test_streaming_over_chunks_equals_one_shot_and_a_restored_state_continues_it(name):
    """In float64, so that the model's own outputs do not depend on the batch (float32 convolutions differ in
    the last bits between batch sizes): what is left to differ is the accumulation."""
    model = models()[name].double()
    images = torch.rand(23, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    whole = estimate_patterns(model, images, batch_size=23)
    chunks = [images[:5], images[5:12], images[12:13], images[13:]]
    streamed = estimate_patterns(model, chunks)
    first = PatternEstimator(model)
    for chunk in chunks[:2]:
        first.update(chunk)
    restored = PatternEstimator(model)
    restored.load_state_dict(copy.deepcopy(first.state_dict()))
    for chunk in chunks[2:]:
        restored.update(chunk)
        first.update(chunk)
    assert torch.equal(  # a restored state continues exactly where the original would have
        restored.result().units[-1].two_component, first.result().units[-1].two_component
    )
    for a, b, c in zip(whole.units, streamed.units, restored.result().units):
        for key in ("linear", "two_component", "positive"):
            torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(getattr(c, key), getattr(a, key), rtol=1e-9, atol=1e-12)
    assert whole.info["images"] == streamed.info["images"] == 23


def test_batchnorm_folding_equals_the_unfolded_layers_including_the_residual_sums():
    model = small_resnet8()  # BatchNorm with non-trivial statistics and affine parameters
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    structure = analyse(model)
    units = {u.name: u for u in structure.units}
    net = model.net
    seen = {}

    def keep(key):
        def hook(module, inputs, output):
            seen[key] = inputs[0].clone()

        return hook

    hooks = [
        net.stem.register_forward_hook(keep("stem_in")),
        net.layer2.register_forward_hook(keep("block_in")),
        net.layer2.conv2.register_forward_hook(keep("h")),
    ]
    with torch.no_grad():
        model(images)
        for hook in hooks:
            hook.remove()
        stem = net.stem[1](net.stem[0](seen["stem_in"]))  # conv, then BatchNorm, unfolded
        block = net.layer2.bn2(net.layer2.conv2(seen["h"])) + net.layer2.downsample(seen["block_in"])
    folded_stem = reconstruct(units["net.stem.0"], [seen["stem_in"]])
    folded_block = reconstruct(units["net.layer2.conv2"], [seen["h"], seen["block_in"]])
    torch.testing.assert_close(folded_stem.float(), stem, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded_block.float(), block, rtol=1e-5, atol=1e-5)
    # The same folded weight as the engine's fold (torch's fuse_conv_bn_eval).
    fused = fold_batchnorm(model).net.stem[0].weight
    torch.testing.assert_close(units["net.stem.0"].weight.float(), fused.reshape(len(fused), -1))
    # A residual unit is the block's last convolution plus its skip (the 1x1 downsampling here, the block's
    # input in layer1), normalised together.
    assert [t.kind for t in units["net.layer1.conv2"].terms] == ["conv", "identity"]
    assert [t.name for t in units["net.layer2.conv2"].terms] == ["net.layer2.conv2", "net.layer2.downsample.0"]
    assert "net.fc" not in units  # no ReLU after the classifier: it keeps its weights


# ---------------------------------------------------------------------------------------------- the backward pass


@pytest.mark.parametrize("name", ["resnet8", "mlp"])
def test_patterns_equal_to_the_weights_give_back_the_gradient(name):
    """PatternNet with a = w and PatternAttribution with a = 1 are the plain gradient: every term, identity
    skips and downsampling included, is wired into the backward pass with its own slice."""
    model = models()[name]
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    targets = torch.arange(6) % 5
    patterns = estimate_patterns(model, images)
    as_weights, as_ones = copy.deepcopy(patterns), copy.deepcopy(patterns)
    for unit, a, b in zip(analyse(model).units, as_weights.units, as_ones.units):
        a.linear = unit.weight.clone()
        b.two_component = torch.ones_like(unit.weight)
    gradient = input_gradients(model, images, targets)
    net = pattern_model(model, as_weights, "net", "linear", "test")
    attribution = pattern_model(model, as_ones, "attribution", "two_component", "test")
    for rewired in (net, attribution):
        torch.testing.assert_close(input_gradients(rewired, images, targets), gradient, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(net(images), model(images))  # the forward pass is the model's own
    real = create("pattern_attribution")(model, images, targets, context=Context(patterns=patterns))
    assert not torch.allclose(real, gradient, atol=1e-3 * gradient.abs().max().item())


class ResidualUnit(nn.Module):
    """head(ReLU(W x + b + x)): one unit of a linear term and an identity skip."""

    def __init__(self, d: int = 5):
        super().__init__()
        self.flatten, self.layer, self.head = nn.Flatten(), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        x = self.flatten(x)
        return self.head(torch.relu(self.layer(x) + x))


def test_a_residual_unit_is_estimated_jointly_and_its_skip_uses_its_pattern_slice():
    torch.manual_seed(0)
    model = ResidualUnit().double().eval()
    images = torch.randn(500, 5, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    patterns = estimate_patterns(model, images, batch_size=128)
    (unit,) = analyse(model).units
    assert [t.kind for t in unit.terms] == ["linear", "identity"] and unit.weight.shape == (5, 10)
    # One normalisation over branch and skip together: wᵀa = 1 with w = [W | I].
    for a in (patterns.units[0].linear, patterns.units[0].two_component):
        torch.testing.assert_close((unit.weight * a).sum(1), torch.ones(5, dtype=torch.float64))
    x = images[:6]
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        gate = (model.layer(x.flatten(1)) + x.flatten(1) > 0).double()
    g = gate * model.head.weight.detach()[targets]  # ∂ logit / ∂ s per sample, [6, 5]
    a, a_plus = patterns.units[0].linear, patterns.units[0].two_component
    w = model.layer.weight.detach()
    # PatternNet: the branch and the skip both back-propagate with their slices of a (the skip's is dense).
    expected_net = g @ a[:, :5] + g @ a[:, 5:]
    # PatternAttribution: W ⊙ a₊ on the branch, I ⊙ a₊ (the diagonal) on the skip.
    expected_pa = g @ (w * a_plus[:, :5]) + g * torch.diagonal(a_plus[:, 5:])
    context = Context(patterns=patterns)
    net = create("pattern_net")(model, x, targets, context=context).flatten(1).double()
    pa = create("pattern_attribution")(model, x, targets, context=context).flatten(1).double()
    torch.testing.assert_close(net, expected_net, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pa, expected_pa, rtol=1e-5, atol=1e-6)


def test_patterns_of_another_architecture_or_other_weights_are_refused():
    nets = models()
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    targets = torch.zeros(8, dtype=torch.long)
    mlp_patterns = estimate_patterns(nets["mlp"], images)
    with pytest.raises(RoarError, match=r"pattern_attribution: the patterns were estimated for another architecture"):
        create("pattern_attribution")(nets["resnet8"], images, targets, context=Context(patterns=mlp_patterns))
    other = copy.deepcopy(nets["mlp"])
    with torch.no_grad():
        other.net.layers[1].weight.mul_(1.5)
    with pytest.raises(RoarError, match=r"pgig: the patterns were estimated for other weights .*net\.layers\.1"):
        create("pgig", steps=2)(other, images, targets, context=Context(patterns=mlp_patterns))
    tanh = Classifier(MLP(3 * 8 * 8, 5, (12,), activation="tanh"), (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(RoarError, match=r"has no convolution or linear layer followed by a ReLU"):
        estimate_patterns(tanh, images)


# ---------------------------------------------------------------------------------------------- the stage


def test_the_stage_writes_reuses_and_recomputes_when_the_model_changes(trained_run, tmp_path):
    from roar.core.provenance import file_hash
    from roar.stages.patterns import patterns_path
    from roar.stages.patterns import run as patterns_stage

    cfg, _ = run_copy(trained_run, tmp_path, "stage", ["patterns.samples=96", "patterns.batch_size=32"])
    first = patterns_stage(cfg)
    path = patterns_path(cfg)
    assert first["status"] == "estimated" and path.exists(), first.summary()
    assert first.summary().startswith("patterns of 7 layers from 96 training images estimated")
    assert {"config.yaml", "provenance.json", "summary.json"} <= {p.name for p in path.parent.iterdir()}
    mtime = path.stat().st_mtime_ns
    again = patterns_stage(cfg)
    assert again["status"] == "reused" and again["digest"] == first["digest"] and path.stat().st_mtime_ns == mtime

    model_file = cfg.run_dir / "train" / "model.pt"
    state = torch.load(model_file, weights_only=False)
    state["state_dict"]["net.layer1.conv1.weight"] *= 1.1
    torch.save(state, model_file)
    changed = patterns_stage(cfg)
    assert changed["status"] == "recomputed: the trained model changed", changed["status"]
    assert changed["digest"] != first["digest"]
    assert load_patterns(path).info["inputs"]["model_hash"] == file_hash(model_file)


def test_a_killed_estimation_resumes_without_redoing_finished_batches(trained_run, tmp_path, monkeypatch):
    from roar.stages.patterns import checkpoint_path, patterns_path
    from roar.stages.patterns import run as patterns_stage

    sets = ["patterns.samples=160", "patterns.batch_size=32", "patterns.checkpoint_every=2"]  # 5 batches
    uninterrupted = patterns_stage(run_copy(trained_run, tmp_path, "whole", sets)[0])
    cfg, _ = run_copy(trained_run, tmp_path, "killed", sets)
    update = PatternEstimator.update
    calls = []

    def dies_in_batch_four(self, images):
        calls.append(len(images))
        if len(calls) == 4:
            raise KeyboardInterrupt  # the kill: nothing after the checkpoint of batch 2 is kept
        return update(self, images)

    monkeypatch.setattr(PatternEstimator, "update", dies_in_batch_four)
    with pytest.raises(KeyboardInterrupt):
        patterns_stage(cfg)
    assert checkpoint_path(cfg).exists() and not patterns_path(cfg).exists()
    calls.clear()
    monkeypatch.setattr(PatternEstimator, "update", lambda self, images: calls.append(1) or update(self, images))
    resumed = patterns_stage(cfg)
    assert len(calls) == 3, "batches 3 to 5 only"
    assert resumed["status"] == "estimated, resumed after 2 batches"
    assert resumed["digest"] == uninterrupted["digest"]
    assert not checkpoint_path(cfg).exists()


def test_extract_estimates_patterns_on_first_use_and_records_them(trained_run, tmp_path):
    from roar.attribution.engine import prepare_model
    from roar.data import build_dataset
    from roar.stages.extract import run as extract
    from roar.stages.extract import store_path
    from roar.stages.patterns import patterns_path
    from roar.store import MapStore
    from roar.training import load_trained_model

    methods = "attribution.methods=[pattern_attribution, pattern_net, {name: pgig, steps: 3}]"
    sets = [methods, "attribution.splits=[test]", "patterns.samples=128", "patterns.batch_size=64"]
    cfg, _ = run_copy(trained_run, tmp_path, "extract", sets)
    result = extract(cfg)
    assert result.summary().endswith("(patterns estimated)"), result.summary()
    patterns = load_patterns(patterns_path(cfg))
    provenance = json.loads((cfg.run_dir / "attributions" / "provenance.json").read_text())
    assert provenance["inputs"]["patterns"] == patterns.digest == result["patterns"]["digest"]
    with MapStore.open(store_path(cfg, "test")) as store:
        assert store.methods == ["pattern_attribution", "pattern_net", "pgig"]
        assert store.method_info("pgig")["patterns"] == patterns.digest
        maps = torch.from_numpy(store.read("pattern_attribution", 0, 8))
        assert all(np.isfinite(store.read(m)).all() and store.read(m).any() for m in store.methods)
    # The stored maps are the method's maps with the stored patterns (to float16 precision).
    model, _ = load_trained_model(cfg.run_dir / "train" / "model.pt")
    images = build_dataset(cfg.dataset).test.images[:8].float() / 255
    model = prepare_model(model, torch.device("cpu"), probe=images)
    raw = create("pattern_attribution")(model, images, model(images).argmax(1), context=Context(patterns=patterns))
    torch.testing.assert_close(maps, raw.square().sum(1), rtol=2e-3, atol=2e-3 * raw.square().sum(1).max().item())

    # Other patterns settings would not fit the stored maps: refused before the patterns file is touched.
    before = patterns_path(cfg).read_bytes()
    changed = cfg.model_copy(update={"patterns": cfg.patterns.model_copy(update={"samples": 64})})
    with pytest.raises(RoarError, match=r"pattern_attribution, pattern_net, pgig computed with patterns that would"):
        extract(changed)
    assert patterns_path(cfg).read_bytes() == before


def test_the_command_line_and_the_taskfile_have_a_patterns_stage(repo):
    from roar.cli import build_parser, cmd_patterns
    from roar.config import config_from_dict

    assert build_parser().parse_args(["patterns", "--set", "patterns.samples=10"]).func is cmd_patterns
    assert config_from_dict({"patterns": {"samples": 10}}).patterns.samples == 10
    with pytest.raises(RoarError, match=r"patterns.sampels: unknown key 'sampels' \(did you mean 'samples'\?\)"):
        config_from_dict({"patterns": {"sampels": 10}})
    task = shutil.which("task") or os.path.join(os.path.dirname(sys.executable), "task")
    env = {**os.environ, "NO_COLOR": "1"}
    dry = subprocess.run([task, "--dry", "patterns"], cwd=repo, capture_output=True, text=True, env=env)
    assert dry.returncode == 0 and "-m roar patterns --config" in dry.stderr + dry.stdout
