"""Randomisation sanity checks and robustness metrics: the randomised copies, the similarities against
scipy and scikit-image, the metrics against Quantus on the same inputs, and the cases whose answer
is known (a model-independent map never changes; the gradient of a linear model ignores its input)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity
from torch import nn

from roar.attribution import Context, create, explainer
from roar.metrics import METRICS
from roar.metrics.randomisation import (
    barely_changes,
    hog_features,
    hog_similarity,
    layer_seed,
    layers_of,
    other_classes,
    pearson,
    randomised,
    spearman,
    ssim,
)
from roar.metrics.robustness import uniform_noise
from roar.perturb.reduce import reduce_map

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

B, C, H, W, K = 4, 3, 8, 8, 5


def conv_model() -> nn.Sequential:
    """A tiny nonlinear classifier with every kind of layer the randomisation resets, trained-looking
    BatchNorm statistics included (so that resetting them changes something)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(C, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * H * W, K),
    )
    bn = model[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def linear_model() -> nn.Sequential:
    """A linear classifier: the gradient of class c is the weight row c, whatever the input."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K)).eval()


def batch(model: nn.Module, method=None) -> dict:
    """The metric inputs of a batch of random images, with the maps ``method`` (gradient) gives them."""
    images = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        targets = model(images).argmax(1)
    method = method or create("gradient")
    maps = reduce_map(method(model, images, targets), "sum_squares", C)
    indices = torch.arange(20, 20 + B)
    explain = bound(method, indices)
    return {"model": model, "images": images, "targets": targets, "maps": maps, "explain": explain, "indices": indices}


def bound(method, indices: torch.Tensor):
    """``method`` as the metrics stage binds it to a batch (the store's reduction, a fixed generator)."""
    return explainer(method, "sum_squares", 0, Context(indices=indices))


def states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def changed_layers(before: dict, after: dict) -> set[str]:
    return {key.rsplit(".", 1)[0] for key in before if not torch.equal(before[key], after[key])}


# ---------------------------------------------------------------------------------------------- randomised copies


def test_the_layers_are_the_modules_with_their_own_tensors_and_a_reset():
    assert [name for name, _ in layers_of(conv_model())] == ["0", "1", "3", "6"]  # not ReLU, Flatten, Sequential


def test_cascading_step_k_reinitialises_exactly_the_top_k_layers_and_leaves_the_model_alone():
    model = conv_model()
    original, rng = states(model), torch.get_rng_state()
    steps = [(name, states(copy)) for name, copy in randomised(model, "cascading", seed=3)]
    assert [name for name, _ in steps] == ["6", "3", "1", "0"]
    for k, (_, after) in enumerate(steps, start=1):
        assert changed_layers(original, after) == set(["6", "3", "1", "0"][:k])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items()), "the model itself changed"
    assert torch.equal(torch.get_rng_state(), rng), "the global random state changed"


def test_independent_randomisation_reinitialises_one_layer_at_a_time_to_the_cascading_weights():
    model = conv_model()
    original = states(model)
    cascading = dict(randomised(model, "cascading", seed=3))  # the last step: every layer random
    last = states(next(iter(cascading.values())))
    for name, copy in randomised(model, "independent", seed=3):
        after = states(copy)
        assert changed_layers(original, after) == {name}
        for key in after:
            if key.startswith(f"{name}."):
                assert torch.equal(after[key], last[key]), "a layer's random weights depend on the seed alone"


def test_a_layer_is_not_reset_to_the_initial_weights_of_a_model_built_under_the_same_seed():
    """``roar train`` builds its model right after ``torch.manual_seed(seed)``: resetting a layer under
    that bare seed would give back its initial weights, which training barely moves."""
    model = conv_model()  # built under torch.manual_seed(0)
    torch.manual_seed(0)
    initial = nn.Conv2d(C, 4, 3, padding=1).weight
    assert torch.equal(model[0].weight, initial)
    reset = {name: copy.state_dict()[f"{name}.weight"].clone() for name, copy in randomised(model, seed=0)}
    assert not torch.equal(reset["0"], initial)


def test_the_randomisation_is_seeded_and_capped_by_layers():
    model = conv_model()
    first = [states(m) for _, m in randomised(model, seed=7)]
    again = [states(m) for _, m in randomised(model, seed=7)]
    other = [states(m) for _, m in randomised(model, seed=8)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    assert not torch.equal(first[0]["6.weight"], other[0]["6.weight"])
    assert [name for name, _ in randomised(model, layers=2)] == ["6", "3"]


# ---------------------------------------------------------------------------------------------- similarities


def test_spearman_equals_scipys_with_ties():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 6, (5, 40), generator=g).float(), torch.randn(5, 40, generator=g)
    b[1] = a[1] * 2 + 1  # a perfect rank association
    ours = spearman(a, b)
    for i in range(5):
        assert ours[i].item() == pytest.approx(spearmanr(a[i], b[i]).statistic, abs=1e-12)
    assert ours[1].item() == pytest.approx(1.0)


def test_correlations_of_constant_maps_are_one_if_both_are_else_zero():
    flat, varied = torch.ones(1, 10), torch.arange(10.0)[None]
    assert spearman(flat, 3 * flat).item() == 1 and pearson(flat, varied).item() == 0


@pytest.mark.parametrize("shape", [(8, 8), (16, 12), (5, 6)])
def test_ssim_equals_scikit_images_structural_similarity(shape):
    g = torch.Generator().manual_seed(5)
    a = torch.rand(3, *shape, generator=g, dtype=torch.float64)
    b = (a + 0.3 * torch.randn(3, *shape, generator=g, dtype=torch.float64)).abs()
    ours = ssim(a, b)
    window = min(7, *shape) - (1 - min(7, *shape) % 2)
    for i in range(3):
        both = torch.cat([a[i].flatten(), b[i].flatten()])
        data_range = (both.max() - both.min()).item()
        expected = structural_similarity(a[i].numpy(), b[i].numpy(), win_size=window, data_range=data_range)
        assert ours[i].item() == pytest.approx(expected, abs=1e-10)
    assert ssim(torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), 0.5)).item() == 1.0  # skimage: 0/0


def test_hog_similarity_is_the_correlation_of_scikit_images_hog_features():
    g = torch.Generator().manual_seed(6)
    a, b = torch.rand(2, 32, 32, generator=g, dtype=torch.float64), torch.rand(2, 32, 32, generator=g).double()
    reference = hog(a[0].numpy(), orientations=9, pixels_per_cell=(8, 8), cells_per_block=(3, 3), block_norm="L2-Hys")
    assert np.array_equal(hog_features(a[0].numpy()), reference)  # skimage's defaults on maps this large
    expected = np.corrcoef(hog_features(a[1].numpy()), hog_features(b[1].numpy()))[0, 1]
    assert hog_similarity(a, b)[1].item() == pytest.approx(expected, abs=1e-10)


# ---------------------------------------------------------------------------------------------- known answers


def test_a_model_independent_map_never_changes_and_is_flagged():
    inputs = batch(linear_model(), create("sobel"))
    out = METRICS.create("model_randomisation").evaluate_batch(**inputs)
    for key in ("model_randomisation", "model_randomisation_ssim", "model_randomisation_hog"):
        assert torch.allclose(out[key], torch.ones(B), atol=1e-6), key
    assert barely_changes(out["model_randomisation_last"])
    logit = METRICS.create("random_logit").evaluate_batch(**inputs)
    assert torch.allclose(logit["random_logit"], torch.ones(B), atol=1e-6)


def test_the_gradient_of_a_randomised_linear_model_changes_and_is_not_flagged():
    """The gradient is the weight row of the target: the reset row is unrelated to the trained one."""
    out = METRICS.create("model_randomisation").evaluate_batch(**batch(linear_model()))
    assert out["model_randomisation"].abs().max() < 0.5
    assert not barely_changes(out["model_randomisation_last"])
    logit = METRICS.create("random_logit", similarity="spearman").evaluate_batch(**batch(linear_model()))
    assert logit["random_logit"].abs().max() < 0.5  # another class's row is another random row


def test_the_companions_name_each_step_and_the_last():
    out = METRICS.create("model_randomisation", similarity="ssim", layers=3).evaluate_batch(**batch(conv_model()))
    steps = ["model_randomisation@6", "model_randomisation@3", "model_randomisation@1"]
    others = ["model_randomisation_spearman", "model_randomisation_hog", "model_randomisation_last"]
    assert set(out) == {"model_randomisation", *others, *steps}
    assert torch.allclose(out["model_randomisation"], torch.stack([out[s] for s in steps]).mean(0))
    assert torch.equal(out["model_randomisation_last"], out[steps[-1]])
    assert "independent_randomisation_last" not in METRICS.create("independent_randomisation").evaluate_batch(
        **batch(conv_model())
    )


def test_the_random_other_class_is_never_the_target_and_depends_on_the_index_alone():
    targets = torch.randint(0, K, (200,), generator=torch.Generator().manual_seed(7))
    indices = torch.arange(200)
    others = other_classes(targets, indices, K, seed=0)
    assert (others != targets).all() and ((others >= 0) & (others < K)).all()
    assert set(((others - targets) % K).tolist()) == set(range(1, K))  # every other class is drawn
    assert torch.equal(other_classes(targets[5:9], indices[5:9], K, seed=0), others[5:9])


# ---------------------------------------------------------------------------------------------- robustness


def test_each_images_noise_is_its_own_and_within_the_radius():
    images = torch.zeros(3, C, H, W)
    noise = uniform_noise(images, torch.tensor([4, 9, 2]), samples=5, radius=0.2, seed=1)
    assert noise.shape == (3, 5, C, H, W) and noise.abs().max() <= 0.2
    assert torch.equal(uniform_noise(images[:1], torch.tensor([9]), 5, 0.2, 1)[0], noise[1])


@pytest.mark.parametrize("name", ["max_sensitivity", "avg_sensitivity"])
def test_sensitivity_is_zero_for_a_constant_map_and_for_the_gradient_of_a_linear_model(name):
    def constant(model, images, targets, **_):
        return torch.ones(len(images), 1, *images.shape[2:])

    metric = METRICS.create(name)
    assert torch.equal(metric.evaluate_batch(**batch(conv_model(), constant))[name], torch.zeros(B))
    assert torch.equal(metric.evaluate_batch(**batch(linear_model()))[name], torch.zeros(B))
    assert (metric.evaluate_batch(**batch(conv_model()))[name] > 0.01).all()


def test_the_sensitivity_of_an_all_zero_map_is_zero_if_it_stays_zero_else_one():
    """Quantus divides by ‖m(x)‖ = 0; ``roar metrics`` refuses values that are not finite."""
    inputs = batch(conv_model(), lambda model, images, targets, **_: torch.zeros(len(images), 1, H, W))
    assert torch.equal(METRICS.create("max_sensitivity").evaluate_batch(**inputs)["max_sensitivity"], torch.zeros(B))
    inputs["explain"] = bound(create("gradient"), inputs["indices"])
    assert torch.equal(METRICS.create("avg_sensitivity").evaluate_batch(**inputs)["avg_sensitivity"], torch.ones(B))


# ---------------------------------------------------------------------------------------------- against Quantus


def explain(model, inputs, targets, **_):
    """``create("gradient")`` as Quantus's ``explain_func``: numpy in, reduced numpy maps out."""
    raw = create("gradient")(model, torch.from_numpy(inputs), torch.from_numpy(np.asarray(targets)))
    return reduce_map(raw, "sum_squares", inputs.shape[1]).numpy()


QUANTUS_ORDERS = [("model_randomisation", "top_down"), ("independent_randomisation", "independent")]


@pytest.mark.parametrize(("name", "order"), QUANTUS_ORDERS)
def test_randomisation_matches_quantus_mprt_layer_by_layer(name, order, monkeypatch):
    """Quantus seeds every layer's reset with ``torch.manual_seed(seed + 1)``, roar each with its own
    ``layer_seed``: Quantus's call is replayed with roar's seed of the layer it is about to reset (its
    order: top-down or, independent, bottom-up), so both reset to the same weights. Its Spearman on
    |map| divided by the batch's max equals ours on |map| divided by each map's max (a rank correlation
    ignores positive scales)."""
    quantus = pytest.importorskip("quantus")
    inputs = batch(conv_model())
    ours = METRICS.create(name, seed=5).evaluate_batch(**inputs)

    names = [layer for layer, _ in layers_of(inputs["model"])]
    pending = iter(names[::-1] if order == "top_down" else names)
    seed_torch = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seed_torch(layer_seed(5, next(pending))))
    theirs = quantus.MPRT(layer_order=order, seed=0, abs=True, normalise=True, disable_warnings=True)(
        model=inputs["model"],
        x_batch=inputs["images"].numpy(),
        y_batch=inputs["targets"].numpy(),
        a_batch=inputs["maps"].numpy(),
        explain_func=explain,
        device="cpu",
    )
    assert next(pending, None) is None, "Quantus reset other layers than roar"
    layers = [layer for layer in theirs if layer != "original"]
    assert sorted(layers) == sorted(names) == sorted(key.split("@")[1] for key in ours if "@" in key)
    for layer in layers:
        np.testing.assert_allclose(ours[f"{name}@{layer}"].numpy(), theirs[layer], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(theirs["original"], 1.0, atol=1e-6)  # the same maps: the same explain_func


@pytest.mark.parametrize(
    ("name", "cls"), [("max_sensitivity", "MaxSensitivity"), ("avg_sensitivity", "AvgSensitivity")]
)
def test_sensitivity_matches_quantus_on_the_same_noise(name, cls):
    """Quantus draws its noise from numpy's global stream, so it is handed a perturbation function that
    replays roar's noise, sample by sample, in the order it asks for them; then the values must agree
    to rounding. (Comparing independently drawn noise would need a tolerance wide enough to hide bugs.)"""
    quantus = pytest.importorskip("quantus")
    inputs = batch(conv_model())
    samples = 6
    noise = uniform_noise(inputs["images"], inputs["indices"], samples, 0.2, seed=0).flatten(2).numpy()
    step = iter(range(samples))

    def replay(arr, **_):
        return arr + noise[:, next(step)]

    ours = METRICS.create(name, samples=samples).evaluate_batch(**inputs)[name]
    theirs = getattr(quantus, cls)(nr_samples=samples, perturb_func=replay, disable_warnings=True)(
        model=inputs["model"],
        x_batch=inputs["images"].numpy(),
        y_batch=inputs["targets"].numpy(),
        a_batch=inputs["maps"].numpy(),
        explain_func=explain,
        device="cpu",
    )
    assert next(step, None) is None, "Quantus asked for a different number of samples"
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), rtol=1e-5)


def test_only_the_chosen_similarities_are_computed_and_they_give_the_same_values():
    inputs = batch(conv_model())
    every = METRICS.create("model_randomisation", layers=3).evaluate_batch(**inputs)
    only = METRICS.create("model_randomisation", layers=3, similarities=["spearman"]).evaluate_batch(**inputs)
    assert "model_randomisation_hog" in every and "model_randomisation_hog" not in only
    assert "model_randomisation_ssim" not in only
    for key, value in only.items():
        assert torch.equal(value, every[key]), key
    with pytest.raises(ValueError, match="similarity 'ssim' must be one of similarities"):
        METRICS.create("model_randomisation", similarity="ssim", similarities=["spearman"])
