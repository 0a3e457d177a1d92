"""The degraded oracles (roar.attribution.oracle): exact at parameter 0, scipy's filters, exact
shuffle counts, per-image randomness, and the known order of their mass on the object."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from roar.attribution import create
from roar.attribution.base import Context
from roar.attribution.oracle import disk, moved_count
from roar.attribution.registry import METHODS, method_class
from roar.core.errors import RoarError

DEGRADATIONS = {
    "oracle_blur": "sigma",
    "oracle_dilate": "radius",
    "oracle_shuffle": "fraction",
    "oracle_noise": "noise",
}


def random_masks(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 [b, h, w] in {0, 1, 2} (2: a second object, not the oracle's)."""
    return torch.tensor(np.random.default_rng(seed).integers(0, 3, size=(b, h, w)), dtype=torch.uint8)


def disk_masks(specs: list[tuple[float, float, float]], size: int = 32) -> torch.Tensor:
    """uint8 [len(specs), size, size]: one disk (centre y, centre x, radius) per image."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([((y - cy) ** 2 + (x - cx) ** 2 <= r * r).to(torch.uint8) for cy, cx, r in specs])


def run(name: str, masks: torch.Tensor, indices=None, generator_seed: int = 0, **params) -> torch.Tensor:
    b, h, w = masks.shape
    indices = torch.arange(b) if indices is None else torch.as_tensor(indices)
    return create(name, **params)(
        None,
        torch.zeros(b, 3, h, w),
        torch.zeros(b),
        generator=torch.Generator().manual_seed(generator_seed),
        context=Context(indices=indices, masks=masks),
    )


def oracle(masks: torch.Tensor) -> torch.Tensor:
    return (masks == 1).float().unsqueeze(1)


def share_on_object(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Σ_object map / Σ map per image: [B]."""
    return (maps * oracle(masks)).flatten(1).sum(1) / maps.flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------- all of them


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_registered_model_free_needing_masks(name):
    method = METHODS.create(name)
    cls = method_class(name)
    assert not method.requires_model and method.passes == 0 and cls.needs == frozenset({"masks"})
    with pytest.raises(RoarError, match=rf"{name} needs a dataset with object masks"):
        method(None, torch.zeros(2, 3, 8, 8), torch.zeros(2))


@pytest.mark.parametrize(
    ("name", "params", "problem"),
    [
        ("oracle_blur", {"sigma": -0.5}, "greater than or equal to 0"),
        ("oracle_dilate", {"radius": -1}, "greater than or equal to 0"),
        ("oracle_dilate", {"radius": 1.5}, "integer"),
        ("oracle_shuffle", {"fraction": 1.01}, "less than or equal to 1"),
        ("oracle_shuffle", {"fraction": -0.1}, "greater than or equal to 0"),
        ("oracle_noise", {"noise": -1}, "greater than or equal to 0"),
    ],
)
def test_parameters_are_validated(name, params, problem):
    with pytest.raises(RoarError, match=problem):
        create(name, **params)


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_defaults(name):
    defaults = {"sigma": 2.0, "radius": 2, "fraction": 0.5, "noise": 0.5}
    parameter = DEGRADATIONS[name]
    assert getattr(create(name).params, parameter) == defaults[parameter]


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_parameter_zero_is_exactly_the_oracle(name):
    masks = random_masks(3, 9, 11)
    truth = create("ground_truth")(None, torch.zeros(3, 3, 9, 11), torch.zeros(3), context=Context(masks=masks))
    out = run(name, masks, **{DEGRADATIONS[name]: 0})
    assert out.shape == (3, 1, 9, 11) and out.dtype == torch.float32
    assert torch.equal(out, truth)


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_an_image_gets_the_same_map_in_any_batch(name):
    """Alone, or at another position among other images: its dataset index decides, not the batch."""
    masks = random_masks(4, 10, 10)
    together = run(name, masks, indices=[5, 6, 7, 8], generator_seed=1)
    for i in range(4):
        alone = run(name, masks[i : i + 1], indices=[5 + i], generator_seed=2)
        assert torch.equal(alone, together[i : i + 1])
    reordered = run(name, masks.flip(0), indices=[8, 7, 6, 5], generator_seed=3)
    assert torch.equal(reordered, together.flip(0))


# ---------------------------------------------------------------------------------------------- blur


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.0, 2.0, 3.3, 6.0])
def test_blur_is_scipys_gaussian_filter(sigma):
    """scipy's defaults, mode='reflect' (d c b a | a b c d) and truncate=4, in float64; at sigma 3.3
    and 6 the kernel (radius 13, 24) is wider than the 9 × 13 map and reflects more than once."""
    masks = random_masks(3, 9, 13, seed=4)
    ours = run("oracle_blur", masks, sigma=sigma)
    expected = np.stack([ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in oracle(masks)[:, 0]])
    np.testing.assert_allclose(ours[:, 0].numpy(), expected, rtol=0, atol=6e-8)  # float32 rounding
    # reflect conserves the mass: what leaves the object lands beside it, none leaves the image.
    np.testing.assert_allclose(ours.sum((1, 2, 3)).numpy(), oracle(masks).sum((1, 2, 3)).numpy(), rtol=1e-6)


def test_blur_spreads_mass_off_the_object_as_sigma_grows():
    masks = disk_masks([(16, 16, 6), (10, 20, 4), (3, 3, 5)])  # the last one cut by the border
    outside = [(run("oracle_blur", masks, sigma=s) * (1 - oracle(masks))).sum((1, 2, 3)) for s in (0, 0.5, 1, 2, 3, 5)]
    assert torch.equal(outside[0], torch.zeros(3))
    for smaller, larger in zip(outside, outside[1:]):
        assert (larger > smaller).all()


def test_blur_keeps_the_ranking_inside_the_object():
    """The centre of a disk ranks above its rim: the map is continuous, not a plateau."""
    out = run("oracle_blur", disk_masks([(16, 16, 6)]))[0, 0]
    assert out[16, 16] > out[16, 19] > out[16, 22] > out[16, 25] > 0


# ---------------------------------------------------------------------------------------------- dilate


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_dilate_is_scipys_binary_dilation_by_a_euclidean_disk(radius):
    masks = torch.zeros(2, 15, 17, dtype=torch.uint8)
    masks[0, 7, 8] = masks[0, 0, 16] = masks[1, 13, 1] = 1  # a point inside and two at the border
    masks[1, 3:6, 4:10] = 1
    masks[1, 9, 9] = 2  # another object: not dilated
    structure = np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    assert np.array_equal(disk(radius).numpy().astype(bool), structure)
    ours = run("oracle_dilate", masks, radius=radius)
    expected = np.stack([ndimage.binary_dilation(m.numpy() == 1, structure=structure) for m in masks])
    assert np.array_equal(ours[:, 0].numpy(), expected.astype(np.float32))


def test_dilate_by_one_is_the_cross_and_radii_nest():
    assert np.array_equal(disk(1).numpy().astype(bool), ndimage.generate_binary_structure(2, 1))
    masks = disk_masks([(16, 16, 3), (2, 28, 2)])
    maps = [run("oracle_dilate", masks, radius=r) for r in range(5)]
    for smaller, larger in zip(maps, maps[1:]):
        assert (larger >= smaller).all() and larger.sum() > smaller.sum()
    assert set(maps[2].unique().tolist()) == {0.0, 1.0}  # the ring ties with the object, by design


# ---------------------------------------------------------------------------------------------- shuffle


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.77, 1.0])
def test_shuffle_moves_exactly_the_rounded_share_off_the_object(fraction):
    masks = torch.cat([random_masks(3, 12, 12, seed=5), disk_masks([(6, 6, 3)], size=12)])
    out = run("oracle_shuffle", masks, fraction=fraction)
    truth = oracle(masks)
    assert set(out.unique().tolist()) <= {0.0, 1.0}  # the exchanged pixels keep their values
    for o, t in zip(out, truth):
        on, off = int(t.sum()), int((1 - t).sum())
        k = math.floor(fraction * on + 0.5)
        assert k <= off  # these masks have room for every moved pixel
        assert int((o * (1 - t)).sum()) == k  # k units of relevance moved off the object
        assert int((o * t).sum()) == on - k  # and k object pixels emptied
        assert o.sum() == on


def test_shuffle_count_rounds_half_up_and_is_capped_by_the_background():
    assert [moved_count(0.5, n, 100) for n in (1, 3, 5, 7)] == [1, 2, 3, 4]
    assert moved_count(0.25, 10, 100) == 3 and moved_count(0.24, 10, 100) == 2
    masks = torch.ones(1, 6, 6, dtype=torch.uint8)
    masks[0, 0, :4] = 0  # 32 object pixels, 4 background
    out = run("oracle_shuffle", masks, fraction=0.5)
    assert out[0, 0, 0, :4].tolist() == [1.0] * 4 and out.sum() == 32


def test_shuffle_nests_in_the_fraction_and_depends_on_seed_and_index():
    masks = disk_masks([(16, 16, 7)] * 2)
    truth = oracle(masks)
    maps = [run("oracle_shuffle", masks, fraction=f) for f in (0.2, 0.4, 0.6)]
    for smaller, larger in zip(maps, maps[1:]):  # one seeded permutation: more moves a superset
        assert ((smaller != truth) <= (larger != truth)).all()
    assert not torch.equal(maps[1][0], maps[1][1])  # same mask, other index: other pixels
    reseeded = run("oracle_shuffle", masks, seed=1)
    assert not torch.equal(reseeded, run("oracle_shuffle", masks)) and torch.equal(
        reseeded, run("oracle_shuffle", masks, seed=1)
    )


# ---------------------------------------------------------------------------------------------- noise


def test_noise_misorders_object_and_background_at_the_known_rate():
    """P(background pixel > object pixel) = Φ(−1 / (noise · √2)) for noise of std ``noise`` × range 1."""
    masks = disk_masks([(64, 64, 40)], size=128)
    truth = oracle(masks)[0, 0].bool()
    for noise in (0.3, 1.0):
        out = run("oracle_noise", masks, noise=noise)[0, 0]
        on, off = out[truth], out[~truth]
        assert abs((out - truth.float()).std().item() - noise) < 0.02 * noise
        pairs = (off[torch.randperm(len(off), generator=torch.Generator().manual_seed(0))[: len(on)]] > on).float()
        expected = 0.5 * math.erfc(1 / (noise * 2))  # Φ(−x) = erfc(x / √2) / 2, x = 1 / (noise √2)
        assert abs(pairs.mean().item() - expected) < 0.02
    assert torch.equal(run("oracle_noise", torch.zeros(1, 8, 8, dtype=torch.uint8)), torch.zeros(1, 1, 8, 8))


def test_noise_depends_on_the_seed():
    masks = random_masks(2, 8, 8)
    assert not torch.equal(run("oracle_noise", masks), run("oracle_noise", masks, seed=3))


# ---------------------------------------------------------------------------------------------- the known order

ORDER_MASKS = [(16, 16, 6), (12, 20, 7.5), (20, 10, 5), (16, 16, 9)]


def test_known_order_of_the_mass_on_the_object():
    """oracle ≥ blur ≥ shuffle ≥ random at the defaults on disks of radius ≥ 5 (thick compared with
    sigma = 2: blur loses ≈ 0.8 σ / R < fraction), covering < 1 − fraction of the image."""
    masks = disk_masks(ORDER_MASKS)
    shares = [share_on_object(run(name, masks), masks) for name in ("ground_truth", "oracle_blur", "oracle_shuffle")]
    shares.append(share_on_object(create("random")(None, torch.zeros(4, 3, 32, 32), torch.zeros(4)), masks))
    assert torch.equal(shares[0], torch.ones(4))
    for better, worse in zip(shares, shares[1:]):
        assert (better > worse).all(), (better, worse)
    on = oracle(masks).sum((1, 2, 3))
    assert torch.equal(shares[2], (on - torch.floor(0.5 * on + 0.5)) / on)  # the shuffle's share, exactly


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("oracle_blur", [0, 0.5, 1, 2, 4, 8]),
        ("oracle_dilate", [0, 1, 2, 3, 5]),
        ("oracle_shuffle", [0, 0.1, 0.3, 0.5, 0.9, 1.0]),
    ],
)
def test_mass_on_the_object_falls_with_the_parameter(name, values):
    masks = disk_masks(ORDER_MASKS)
    shares = [share_on_object(run(name, masks, **{DEGRADATIONS[name]: v}), masks) for v in values]
    assert torch.equal(shares[0], torch.ones(4))
    for smaller, larger in zip(shares, shares[1:]):
        assert (larger < smaller).all()
