"""Localisation and complexity metrics: values worked out by hand, equality with Quantus 0.6 on the
same inputs, the known order oracle ≥ blurred ≥ shuffled ≥ random, and the extremes of sparseness
and complexity. (Finite values, determinism and batch invariance: ``tests/test_contracts.py``.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from roar.metrics import METRICS
from roar.perturb.ranking import count, ranking, ranks

LOCALISATION = [
    "pointing_game",
    "relevance_mass",
    "relevance_rank",
    "top_k_intersection",
    "auc",
    "energy_pointing_game",
]
COMPLEXITY = ["sparseness", "complexity", "effective_complexity"]


def evaluate(name: str, maps: torch.Tensor, masks=None, **params) -> torch.Tensor:
    """The metric's values for maps [B, H, W] or one [H, W] (and masks), built with ``params``;
    the images' indices (the tie-break's key) are 0 … B − 1."""
    if maps.ndim == 2:
        maps = maps[None]
    inputs = {"maps": maps, "indices": torch.arange(len(maps))}
    if masks is not None:
        masks = torch.as_tensor(masks, dtype=torch.bool)
        inputs["masks"] = masks[None] if masks.ndim == 2 else masks
    return METRICS.create(name, **params).evaluate_batch(**inputs)[name]


def mask_of(size: int, *pixels: tuple[int, int]) -> torch.Tensor:
    masks = torch.zeros(size, size, dtype=torch.bool)
    for y, x in pixels:
        masks[y, x] = True
    return masks


# --------------------------------------------------------------------------------------------- declarations


def test_the_metrics_are_registered_with_their_directions_and_defaults():
    directions = {name: METRICS.get(name).direction for name in LOCALISATION + COMPLEXITY}
    expected = dict.fromkeys(LOCALISATION + ["sparseness"], "higher") | dict.fromkeys(COMPLEXITY[1:], "lower")
    assert directions == expected
    assert all(METRICS.get(n).needs == {"maps", "masks"} for n in LOCALISATION)
    assert all(METRICS.get(n).needs == {"maps"} for n in COMPLEXITY)
    assert METRICS.create("pointing_game").params.tolerance == 15
    assert METRICS.create("top_k_intersection").params.fraction == 0.02
    assert METRICS.create("effective_complexity").params.eps == 1e-5


# --------------------------------------------------------------------------------------------- by hand


def test_pointing_game_by_hand():
    maps = torch.zeros(5, 5)
    maps[0, 0] = 1.0  # the maximum, at distance √8 ≈ 2.83 from the object's nearest pixel (2, 2)
    masks = torch.zeros(5, 5, dtype=torch.bool)
    masks[2:4, 2:4] = True
    assert evaluate("pointing_game", maps, masks, tolerance=0).item() == 0
    assert evaluate("pointing_game", maps, masks, tolerance=2).item() == 0
    assert evaluate("pointing_game", maps, masks, tolerance=3).item() == 1
    maps[3, 2] = 2.0  # now on the object
    assert evaluate("pointing_game", maps, masks, tolerance=0).item() == 1
    assert evaluate("pointing_game", maps, torch.zeros(5, 5), tolerance=15).item() == 0  # empty mask


def test_pointing_game_breaks_ties_of_the_maximum_by_the_seeded_ranking():
    flat = torch.ones(1, 4, 4)
    hits = []
    for seed in range(32):
        top = ranking(flat, torch.tensor([0]), seed)[0, 0].item()
        masks = mask_of(4, divmod(top, 4))  # exactly the pixel the tie-break picks
        assert evaluate("pointing_game", flat, masks, tolerance=0, seed=seed).item() == 1
        hits.append(evaluate("pointing_game", flat, mask_of(4, (0, 0)), tolerance=0, seed=seed).item())
    assert 0 < sum(hits) < 32, "ties are broken by a seeded hash, not by scan order"


def test_relevance_mass_by_hand_counts_only_positive_relevance():
    maps = torch.tensor([[4.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, -3, 0], [0, 0, 0, 2]])
    masks = torch.zeros(4, 4, dtype=torch.bool)
    masks[:2, :2] = True
    assert evaluate("relevance_mass", maps, masks).item() == pytest.approx(6 / 8)  # (4 + 2) / (4 + 2 + 2)
    assert evaluate("relevance_mass", -maps.abs(), masks).item() == pytest.approx(4 / 16)  # no positive: |mask|/P
    assert evaluate("relevance_mass", maps, torch.zeros(4, 4)).item() == 0
    assert evaluate("relevance_mass", maps, torch.ones(4, 4)).item() == 1


def test_relevance_rank_by_hand():
    maps = torch.arange(16.0).reshape(4, 4)  # the top 3: (3, 3), (3, 2), (3, 1)
    masks = mask_of(4, (3, 3), (3, 2), (0, 0))
    assert evaluate("relevance_rank", maps, masks).item() == pytest.approx(2 / 3)
    assert evaluate("relevance_rank", maps, torch.zeros(4, 4)).item() == 0
    assert evaluate("relevance_rank", maps, torch.ones(4, 4)).item() == 1


def test_top_k_intersection_by_hand():
    maps = torch.arange(16.0).reshape(4, 4)  # the top 4: the bottom row
    masks = mask_of(4, (3, 3), (0, 0))
    assert evaluate("top_k_intersection", maps, masks, fraction=0.25).item() == pytest.approx(1 / 4)
    assert evaluate("top_k_intersection", maps, masks, fraction=0.01).item() == 1  # k = max(0, 1) = 1: (3, 3)
    assert evaluate("top_k_intersection", maps, torch.zeros(4, 4), fraction=0.25).item() == 0


def test_auc_by_hand_counts_ties_as_half():
    # Object pixels 3, 3, 2, 1; background 2, 2, 1 and nine 0s. Of the 4 × 12 pairs, the object
    # pixel wins 12 + 12 (the 3s) + 10 + ½·2 (the 2) + 9 + ½·1 (the 1) = 44.5.
    values = torch.tensor([3.0, 3, 2, 1, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    order = torch.tensor([5, 12, 0, 9, 3, 14, 7, 1, 2, 4, 6, 8, 10, 11, 13, 15])  # scatter over the image
    maps = torch.empty(16).index_put_((order,), values).reshape(4, 4)
    masks = torch.zeros(16, dtype=torch.bool).index_put_((order[:4],), torch.tensor(True)).reshape(4, 4)
    assert evaluate("auc", maps, masks).item() == pytest.approx(44.5 / 48)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert evaluate("auc", maps, masks).item() == pytest.approx(sklearn.roc_auc_score(masks.flatten(), maps.flatten()))
    assert evaluate("auc", -maps, masks).item() == pytest.approx(1 - 44.5 / 48)
    for degenerate in (torch.ones(4, 4), torch.zeros(4, 4)):  # empty or full mask, flat map: chance
        assert evaluate("auc", maps, degenerate).item() == 0.5
    assert evaluate("auc", torch.ones(4, 4), masks).item() == 0.5


def test_energy_pointing_game_uses_the_bounding_box_of_the_mask():
    masks = mask_of(5, (1, 1), (3, 1), (3, 3))  # bounding box: rows 1–3, columns 1–3
    maps = torch.zeros(5, 5)
    maps[1, 1], maps[2, 2], maps[0, 0], maps[4, 4] = 2.0, 1.0, 1.0, -5.0  # (2, 2): in the box, off the mask
    assert evaluate("energy_pointing_game", maps, masks).item() == pytest.approx(3 / 4)
    assert evaluate("relevance_mass", maps, masks).item() == pytest.approx(2 / 4)
    assert evaluate("energy_pointing_game", maps, torch.zeros(5, 5)).item() == 0
    assert evaluate("energy_pointing_game", torch.zeros(5, 5), masks).item() == pytest.approx(9 / 25)


def test_sparseness_by_hand():
    one_hot = torch.zeros(4, 4)
    one_hot[1, 2] = -3.0
    assert evaluate("sparseness", one_hot).item() == pytest.approx(15 / 16)  # (n − 1) / n
    assert evaluate("sparseness", torch.full((4, 4), 0.5)).item() == pytest.approx(0, abs=1e-7)
    two = torch.zeros(4, 4)
    two[0, 0], two[3, 3] = 1.0, -1.0  # sorted: 14 zeros, 1, 1 → (13 + 15) / (16 · 2)
    assert evaluate("sparseness", two).item() == pytest.approx(28 / 32)
    assert evaluate("sparseness", torch.zeros(4, 4)).item() == 0  # a zero map scores as a flat one


def test_complexity_by_hand():
    one_hot = torch.zeros(4, 4)
    one_hot[2, 1] = 7.0
    assert evaluate("complexity", one_hot).item() == pytest.approx(0, abs=1e-7)
    assert evaluate("complexity", torch.full((4, 4), -2.0)).item() == pytest.approx(math.log(16))
    maps = torch.zeros(4, 4)
    maps[0, 0], maps[0, 1] = 3.0, -1.0  # p = (¾, ¼)
    assert evaluate("complexity", maps).item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert evaluate("complexity", torch.zeros(4, 4)).item() == pytest.approx(math.log(16))


def test_effective_complexity_by_hand_is_a_share_relative_to_the_largest_magnitude():
    maps = torch.zeros(4, 4)
    maps[0, 0], maps[1, 1], maps[2, 2] = -1.0, 0.5, 1e-6  # 1e-6 / 1 is below eps = 1e-5
    assert evaluate("effective_complexity", maps).item() == pytest.approx(2 / 16)
    assert evaluate("effective_complexity", maps * 1e-6).item() == pytest.approx(2 / 16)  # scale-free
    assert evaluate("effective_complexity", maps, eps=1e-7).item() == pytest.approx(3 / 16)
    assert evaluate("effective_complexity", torch.zeros(4, 4)).item() == 1  # a zero map scores as a flat one


@pytest.mark.parametrize("name", LOCALISATION + COMPLEXITY)
def test_float16_maps_give_the_float32_values_of_the_same_maps(name):
    # A store may hold maps in float16; its values are exact in float32, and so must the metrics' be.
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(4, 8, 8, generator=g).half()
    maps[1] = maps[1].round()  # ties
    masks = torch.rand(4, 8, 8, generator=g) > 0.7
    half = evaluate(name, maps, masks)
    assert half.dtype == torch.float32
    assert torch.equal(half, evaluate(name, maps.float(), masks))


# --------------------------------------------------------------------------------------------- Quantus


@pytest.fixture(scope="module")
def quantus():
    return pytest.importorskip("quantus")


def shaped_masks(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Masks of several shapes, none empty or full (Quantus returns NaN or errs on those): squares,
    disks, a thin line, a single pixel, random blobs."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        cy, cx = torch.randint(2, size - 2, (2,), generator=g).tolist()
        r = int(torch.randint(1, size // 3, (), generator=g))
        kind = i % 5
        if kind == 0:
            masks[i, max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r] = True
        elif kind == 1:
            masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif kind == 2:
            masks[i, cy, :] = True
        elif kind == 3:
            masks[i, cy, cx] = True
        else:
            masks[i] = torch.rand(size, size, generator=g) < 0.3
            masks[i, cy, cx] = True
    return masks


@pytest.fixture(scope="module")
def inputs():
    """Random maps (continuous: no ties, where Quantus and roar break ties differently) and masks."""
    g = torch.Generator().manual_seed(3)
    n, size = 20, 12
    maps = torch.randn(n, size, size, generator=g)
    maps[::4] *= (torch.rand(5, size, size, generator=g) < 0.4).float()  # some maps mostly zero
    return maps, shaped_masks(n, size, g)


def quantus_scores(metric, maps: torch.Tensor, masks: torch.Tensor | None = None) -> np.ndarray:
    """Quantus's values on numpy x [B, 3, H, W], y [B], a [B, 1, H, W], s [B, 1, H, W] and a tiny
    model (which these metrics do not call but Quantus requires)."""
    n, h, w = maps.shape
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, 2)).eval()
    x = np.zeros((n, 3, h, w), dtype=np.float32)
    s = None if masks is None else masks[:, None].numpy().astype(np.float32)
    a = maps[:, None].numpy().copy()
    scores = metric(model=model, x_batch=x, y_batch=np.zeros(n, dtype=np.int64), a_batch=a, s_batch=s, device="cpu")
    return np.asarray(scores, dtype=np.float64)


# Quantus without its preprocessing: no normalisation by the batch's maximum (roar's values are
# per image and, for localisation, scale-free), no absolute value for the localisation metrics
# (they read signed relevance), the absolute value (its default) for the complexity metrics.
LOCAL = {"disable_warnings": True, "normalise": False, "abs": False}
MAGNITUDE = {"disable_warnings": True, "normalise": False, "abs": True}


def untied(maps: torch.Tensor) -> torch.Tensor:
    """The maps as −(roar's rank of each pixel): the same order, without ties.

    Where values tie (the mostly-zero maps here), roar breaks ties by its seeded hash and Quantus by
    NumPy's argsort; handing Quantus these maps takes that one difference out of the comparison.
    """
    return -ranks(maps, torch.arange(len(maps)), 0)[:, 0].float()


def test_pointing_game_equals_quantus_with_no_tolerance(quantus, inputs):
    maps, masks = inputs
    expected = quantus_scores(quantus.PointingGame(**LOCAL), untied(maps), masks)
    np.testing.assert_allclose(evaluate("pointing_game", maps, masks, tolerance=0).numpy(), expected, atol=1e-5)


def test_relevance_mass_equals_quantus_on_maps_clipped_at_zero(quantus, inputs):
    # Quantus sums signed relevance; roar counts positive relevance only, so Quantus gets the
    # clipped maps and roar the raw ones.
    maps, masks = inputs
    expected = quantus_scores(quantus.RelevanceMassAccuracy(**LOCAL), maps.clamp_min(0), masks)
    np.testing.assert_allclose(evaluate("relevance_mass", maps, masks).numpy(), expected, atol=1e-5)


def test_relevance_rank_equals_quantus(quantus, inputs):
    maps, masks = inputs
    expected = quantus_scores(quantus.RelevanceRankAccuracy(**LOCAL), untied(maps), masks)
    np.testing.assert_allclose(evaluate("relevance_rank", maps, masks).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.5])
def test_top_k_intersection_equals_quantus_with_the_same_number_of_pixels(quantus, inputs, fraction):
    maps, masks = inputs
    k = max(count(fraction, maps[0].numel()), 1)
    expected = quantus_scores(quantus.TopKIntersection(k=k, **LOCAL), untied(maps), masks)
    actual = evaluate("top_k_intersection", maps, masks, fraction=fraction)
    np.testing.assert_allclose(actual.numpy(), expected, atol=1e-5)


def test_auc_equals_quantus_also_with_ties(quantus, inputs):
    maps, masks = inputs
    quantised = (maps * 2).round()  # many ties: average ranks against roc_curve's tied thresholds
    for m in (maps, quantised):
        expected = quantus_scores(quantus.AUC(**LOCAL), m, masks)
        np.testing.assert_allclose(evaluate("auc", m, masks).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("name, cls", [("sparseness", "Sparseness"), ("complexity", "Complexity")])
def test_sparseness_and_complexity_equal_quantus(quantus, inputs, name, cls):
    maps, _ = inputs
    expected = quantus_scores(getattr(quantus, cls)(**MAGNITUDE), maps)
    np.testing.assert_allclose(evaluate(name, maps).numpy(), expected, atol=1e-5)


def test_effective_complexity_equals_quantus_count_on_maps_normalised_per_image(quantus, inputs):
    # Quantus's own normalisation divides by the batch's largest magnitude; roar divides each map by
    # its own, so Quantus gets maps already so divided, and its count is divided by P.
    maps, _ = inputs
    maps = maps.clone()
    maps[1::3] *= torch.logspace(-8, 0, maps.shape[-1])  # magnitudes on both sides of eps
    per_image = maps / maps.abs().amax((1, 2), keepdim=True)
    for eps in (1e-5, 1e-2):
        expected = quantus_scores(quantus.EffectiveComplexity(eps=eps, **MAGNITUDE), per_image) / maps[0].numel()
        np.testing.assert_allclose(evaluate("effective_complexity", maps, eps=eps).numpy(), expected, atol=1e-6)


# --------------------------------------------------------------------------------------------- known order


def square_masks(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        side = int(torch.randint(6, 11, (), generator=g))
        y, x = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
        masks[i, y : y + side, x : x + side] = True
    return masks


def gaussian_blur(maps: torch.Tensor, sigma: float = 2.0, radius: int = 4) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.pad(maps[:, None], (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, kernel.view(1, 1, -1, 1))[:, 0]


def shuffle_half(maps: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each map with the values of a random half of its pixels permuted among those pixels."""
    flat = maps.reshape(len(maps), -1).clone()
    p = flat.shape[1]
    for row in flat:
        chosen = torch.randperm(p, generator=g)[: p // 2]
        row[chosen] = row[chosen[torch.randperm(p // 2, generator=g)]]
    return flat.reshape(maps.shape)


def seeded(name: str, seed: int) -> dict:
    """``{"seed": seed}`` for a metric with a tie-break seed, else nothing."""
    return {"seed": seed} if "seed" in METRICS.get(name).config.model_fields else {}


@pytest.mark.parametrize(
    "name, params", [(name, {}) for name in LOCALISATION] + [("pointing_game", {"tolerance": 0})], ids=str
)
def test_localisation_orders_oracle_blurred_shuffled_random(name, params):
    means = {"oracle": 0.0, "blurred": 0.0, "shuffled": 0.0, "random": 0.0}
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        n, size = 24, 32
        masks = square_masks(n, size, g)
        oracle = masks.float() + 0.01 * torch.randn(n, size, size, generator=g)
        maps = {
            "oracle": oracle,
            "blurred": gaussian_blur(oracle),
            "shuffled": shuffle_half(oracle, g),
            "random": torch.randn(n, size, size, generator=g),
        }
        for kind, m in maps.items():
            means[kind] += evaluate(name, m, masks, **seeded(name, seed), **params).mean().item() / 3
    assert means["oracle"] >= means["blurred"] >= means["shuffled"] >= means["random"], means
    assert means["oracle"] > means["random"], means


# --------------------------------------------------------------------------------------------- extremes


def test_a_one_hot_map_is_the_sparsest_and_least_complex_and_a_flat_map_the_opposite():
    g = torch.Generator().manual_seed(0)
    others = torch.cat([torch.randn(8, 6, 6, generator=g), torch.rand(8, 6, 6, generator=g) ** 8])
    one_hot = torch.zeros(1, 6, 6)
    one_hot[0, 4, 1] = 2.5
    flat = torch.full((1, 6, 6), -0.3)
    for name, best_is_high in (("sparseness", True), ("complexity", False), ("effective_complexity", False)):
        sign = 1 if best_is_high else -1
        best, worst = sign * evaluate(name, one_hot), sign * evaluate(name, flat)
        values = sign * evaluate(name, others)
        assert (best >= values).all() and (values >= worst).all() and best > worst, name
    assert evaluate("sparseness", one_hot).item() == pytest.approx(35 / 36)
    assert evaluate("complexity", flat).item() == pytest.approx(math.log(36))
    assert evaluate("effective_complexity", one_hot).item() == pytest.approx(1 / 36)
