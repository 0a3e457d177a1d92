"""Rankings, ROAR/KAR masks and fills: exact counts, seeded tie-breaking, and the seed's KAR bug."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from roar.core.errors import RoarError
from roar.perturb import (
    FILLS,
    ablate,
    build_fill,
    count,
    mask_from_ranks,
    ranking,
    ranks,
    removal_mask,
    tie_break_keys,
)

FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
H, W = 7, 9  # 63 positions: no fraction above gives a whole number
P = H * W
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)


def shuffled_maps(b: int, h: int = H, w: int = W, seed: int = 0) -> torch.Tensor:
    """Maps whose values are a permutation of 0..h·w-1 per image: a known ranking without ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(h * w, generator=g) for _ in range(b)]).float().view(b, h, w)


def blocky_maps(b: int, seed: int = 0) -> torch.Tensor:
    """GradCAM-like maps: a 2×3 grid upsampled (nearest) to 7×9, i.e. six blocks of tied values."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 1, 2, 3, generator=g)
    return F.interpolate(coarse, size=(H, W), mode="nearest")[:, 0]


# --------------------------------------------------------------------------------------------- counting


def test_count_rounds_half_up_from_the_decimal_fraction():
    assert count(0.5, 63) == 32  # 31.5 → 32
    assert count(0.25, 2) == 1  # Python's round(0.5) would give 0
    assert count(0.3, 5) == 2  # 0.3 * 5 == 1.4999999999999998 in binary
    assert [count(t, 63) for t in FRACTIONS] == [6, 19, 32, 44, 57]
    assert count(0.0, 63) == 0 and count(1.0, 63) == 63
    for bad in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            count(bad, 10)


# --------------------------------------------------------------------------------------------- ROAR and KAR


@pytest.mark.parametrize("t", FRACTIONS)
def test_kar_keeps_and_roar_removes_exactly_the_top_fraction(t):
    maps = shuffled_maps(16)
    idx = torch.arange(16)
    k = count(t, P)
    top = maps >= P - k  # the k highest values of each image
    roar = removal_mask(maps, idx, t, "roar", seed=1)
    kar = removal_mask(maps, idx, t, "kar", seed=1)
    assert roar.shape == kar.shape == (16, 3, H, W)
    assert torch.equal(roar[:, 0], top)
    assert torch.equal(~kar[:, 0], top)  # KAR keeps exactly the top k ...
    assert (~kar[:, 0]).sum(dim=(1, 2)).eq(k).all()  # ... and nothing else
    assert torch.equal(roar, ~kar)  # complements for the same ranking and k
    # The ROAR seed's KAR replaced the lowest t% (LeRF) instead: that is a different mask.
    lowest = removal_mask(maps, idx, t, "lerf", seed=1)
    assert torch.equal(lowest[:, 0], maps < k)
    assert not torch.equal(lowest, kar)


def test_extreme_fractions():
    maps, idx = shuffled_maps(4), torch.arange(4)
    assert not removal_mask(maps, idx, 0.0, "roar").any()
    assert removal_mask(maps, idx, 1.0, "roar").all()
    assert removal_mask(maps, idx, 0.0, "kar").all()  # KAR at 0 keeps nothing
    assert not removal_mask(maps, idx, 1.0, "kar").any()


def test_ranking_orders_by_value_then_key():
    maps, idx = shuffled_maps(8), torch.arange(8)
    order = ranking(maps, idx, seed=0)
    values = maps.reshape(8, -1).gather(1, order)
    assert torch.equal(values, torch.arange(P - 1, -1, -1).float().expand(8, P))
    r = ranks(maps, idx, seed=0)
    assert r.shape == (8, 1, H, W)
    assert torch.equal(r[:, 0], (P - 1 - maps).long())
    # Within a block of ties the order follows the keys.
    flat = torch.zeros(2, P)
    keys = tie_break_keys(torch.arange(2), P, seed=0)
    assert torch.equal(ranking(flat.view(2, H, W), torch.arange(2), seed=0), torch.argsort(keys, dim=1))


@pytest.mark.parametrize("kind", ["constant", "blocky", "binary"])
@pytest.mark.parametrize("mode", ["roar", "kar", "lerf"])
def test_exact_counts_with_ties(kind, mode):
    b = 32
    g = torch.Generator().manual_seed(3)
    maps = {
        "constant": torch.full((b, H, W), 0.25),
        "blocky": blocky_maps(b),
        "binary": (torch.rand(b, H, W, generator=g) < 0.5).float(),  # e.g. a ReLU'd map: half zeros
    }[kind]
    idx = torch.arange(100, 100 + b)
    for t in FRACTIONS:
        k = count(t, P)
        mask = removal_mask(maps, idx, t, mode, seed=7)[:, 0]
        expected = P - k if mode == "kar" else k
        assert mask.sum(dim=(1, 2)).eq(expected).all(), (kind, mode, t)
        # Ties never override values: every replaced position of ROAR is at least as relevant as every kept one.
        if mode == "roar":
            flat, m = maps.reshape(b, -1), mask.reshape(b, -1)
            lo = torch.where(m, flat, torch.inf).min(1).values
            hi = torch.where(~m, flat, -torch.inf).max(1).values
            assert (lo >= hi).all()


# --------------------------------------------------------------------------------------------- tie-breaking


def test_ties_are_spread_over_the_image_not_scan_order():
    b, h, w = 256, 8, 8
    mask = removal_mask(torch.zeros(b, h, w), torch.arange(b), 0.5, "roar", seed=0)[:, 0].float()
    assert mask.sum(dim=(1, 2)).eq(32).all()
    top, bottom = mask[:, : h // 2].mean().item(), mask[:, h // 2 :].mean().item()
    left, right = mask[:, :, : w // 2].mean().item(), mask[:, :, w // 2 :].mean().item()
    for share in (top, bottom, left, right):
        assert abs(share - 0.5) < 0.1, (top, bottom, left, right)  # scan order gives top = 1, bottom = 0
    # Every position is removed in some images and kept in others.
    per_position = mask.mean(0)
    assert per_position.min() > 0.25 and per_position.max() < 0.75


def test_tie_break_is_independent_of_the_batch():
    maps = blocky_maps(64, seed=1)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0)) + 1000
    batch = ranks(maps, perm, seed=5)
    for pos in (0, 17, 63):
        alone = ranks(maps[pos : pos + 1], perm[pos : pos + 1], seed=5)
        assert torch.equal(alone[0], batch[pos])
    # The same image index at another batch position gets the same tie-break.
    moved = ranks(maps.flip(0), perm.flip(0), seed=5)
    assert torch.equal(moved.flip(0), batch)
    # Keys depend on the index values only, not on how they are passed.
    assert torch.equal(tie_break_keys(perm.tolist(), P, 5, "cpu"), tie_break_keys(perm.int(), P, 5, "cpu"))


def test_seeds_and_images_give_different_tie_breaks():
    flat = torch.zeros(2, H, W)
    same_index = torch.tensor([3, 3])
    a = ranks(flat, same_index, seed=0)
    assert torch.equal(a[0], a[1])
    assert not torch.equal(ranks(flat[:1], same_index[:1], seed=1), a[:1])
    b = ranks(flat, torch.tensor([3, 4]), seed=0)
    assert not torch.equal(b[0], b[1])


def _reference_keys(index: int, n: int, seed: int) -> list[int]:
    """The keys in plain Python integers: catches any int64 overflow in the tensor version."""

    def h32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    def absorb(state, value):
        state = h32(state ^ (value & 0xFFFFFFFF))
        return h32(state ^ ((value >> 32) & 0xFFFFFFFF))

    words = []
    for stream in (0x243F6A88, 0x85A308D3):
        state = absorb(absorb(stream, seed), index)
        words.append([h32(h32(state ^ p) ^ 0x9E3779B9) for p in range(n)])
    return [((a & 0x7FFFFFFF) << 32) | b for a, b in zip(*words)]


def test_keys_match_a_plain_integer_reference():
    indices = [0, 1, 12345, 2**40 + 7]
    keys = tie_break_keys(torch.tensor(indices), 50, seed=2**33 + 9)
    for row, i in zip(keys.tolist(), indices):
        assert row == _reference_keys(i, 50, 2**33 + 9)
    assert (keys >= 0).all()
    # Pinned values: stored results depend on them, so a change must be deliberate.
    assert tie_break_keys(torch.tensor([0]), 3, seed=0).tolist() == [
        [6410754615759208363, 6071768008324216358, 5085804642692657458]
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_keys_and_ranks_identical_on_cuda():
    maps, idx = blocky_maps(8), torch.arange(8)
    assert torch.equal(tie_break_keys(idx, P, 3, "cuda").cpu(), tie_break_keys(idx, P, 3, "cpu"))
    assert torch.equal(ranks(maps.cuda(), idx, 3).cpu(), ranks(maps, idx, 3))


# --------------------------------------------------------------------------------------------- granularity


def test_pixel_masks_are_identical_across_channels():
    mask = removal_mask(shuffled_maps(4), torch.arange(4), 0.3, "roar", channels=3)
    assert torch.equal(mask[:, 0], mask[:, 1]) and torch.equal(mask[:, 0], mask[:, 2])
    same = removal_mask(shuffled_maps(4)[:, None], torch.arange(4), 0.3, "roar", channels=3)
    assert torch.equal(mask, same)  # [B, 1, H, W] maps are pixel maps too


@pytest.mark.parametrize("t", FRACTIONS)
def test_element_masks_rank_every_scalar(t):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 3, H, W, generator=g)
    mask = removal_mask(maps, torch.arange(6), t, "roar", granularity="element", channels=3)
    assert mask.shape == (6, 3, H, W)
    assert mask.sum(dim=(1, 2, 3)).eq(count(t, 3 * P)).all()
    assert not torch.equal(mask[:, 0], mask[:, 1])
    kar = removal_mask(maps, torch.arange(6), t, "kar", granularity="element", channels=3)
    assert torch.equal(kar, ~mask)


def test_granularity_shape_checks():
    idx = torch.arange(2)
    with pytest.raises(ValueError, match="pixel granularity"):
        removal_mask(torch.rand(2, 3, H, W), idx, 0.5)
    with pytest.raises(ValueError, match="element granularity"):
        removal_mask(torch.rand(2, H, W), idx, 0.5, granularity="element")
    with pytest.raises(ValueError, match="channels"):
        removal_mask(torch.rand(2, 1, H, W), idx, 0.5, granularity="element", channels=3)
    with pytest.raises(ValueError, match="granularity"):
        ranks(torch.rand(2, H, W), idx, 0, granularity="patch")
    with pytest.raises(ValueError, match="mode"):
        removal_mask(torch.rand(2, H, W), idx, 0.5, mode="keep")
    with pytest.raises(ValueError, match="indices"):
        ranks(torch.rand(2, H, W), torch.arange(3), 0)


def test_nan_maps_are_refused():
    maps = torch.rand(3, H, W)
    maps[1, 2, 3] = float("nan")
    for call in (
        lambda: ranking(maps, torch.arange(3), 0),
        lambda: ranks(maps, torch.arange(3), 0),
        lambda: removal_mask(maps, torch.arange(3), 0.5),
    ):
        with pytest.raises(ValueError, match="NaN"):
            call()


def test_many_fractions_from_one_ranking_match_the_direct_masks():
    maps, idx = blocky_maps(8), torch.arange(8)
    r = ranks(maps, idx, seed=2)
    for t in FRACTIONS:
        for mode in ("roar", "kar", "lerf"):
            assert torch.equal(mask_from_ranks(r, t, mode, 3), removal_mask(maps, idx, t, mode, seed=2))


# --------------------------------------------------------------------------------------------- fills


def _images_and_mask(b=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, c, H, W, generator=g)
    mask = removal_mask(shuffled_maps(b, seed=seed), torch.arange(b), 0.5, "roar", channels=c)
    return images, mask


def test_mean_fill_puts_the_mean_and_leaves_the_rest_bit_identical():
    images, mask = _images_and_mask()
    out = ablate(images, mask, build_fill("mean", mean=CIFAR_MEAN))
    expected = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1).expand_as(images)
    assert torch.equal(out[mask], expected[mask])
    assert torch.equal(out[~mask], images[~mask])
    assert torch.equal(images, _images_and_mask()[0])  # the input is not modified


def test_mean_fill_config_and_errors():
    images, mask = _images_and_mask()
    # An explicit value in the fill's config overrides the dataset mean.
    own = build_fill(FILLS.config_class("mean")(mean=[0.5, 0.25, 1.0]), mean=CIFAR_MEAN)
    out = ablate(images, mask, own)
    assert torch.equal(out[mask], torch.tensor([0.5, 0.25, 1.0]).view(1, 3, 1, 1).expand_as(images)[mask])
    with pytest.raises(RoarError, match="mean"):
        build_fill("mean")
    with pytest.raises(RoarError, match="\\[0, 1\\]"):
        build_fill("mean", mean=(124.0, 116.0, 104.0))  # 0..255 values are a mistake
    with pytest.raises(ValueError, match="channel"):
        ablate(images, mask, build_fill("mean", mean=(0.5, 0.5)))
    with pytest.raises(RoarError, match="did you mean 'blur'"):
        build_fill("blurr")
    with pytest.raises(RoarError, match="sigma"):
        build_fill("blur", sigma=-1)
    with pytest.raises(RoarError, match="unknown key 'sigm'"):
        build_fill("blur", sigm=1)


def test_zero_fill():
    images, mask = _images_and_mask()
    out = ablate(images, mask, build_fill("zero"))
    assert (out[mask] == 0).all()
    assert torch.equal(out[~mask], images[~mask])


@pytest.mark.parametrize("sigma", [0.7, 2.0, 5.0])  # 5.0: a kernel wider than the 7×9 image
def test_blur_fill_matches_scipy(sigma):
    images, mask = _images_and_mask(b=3)
    out = ablate(images, mask, build_fill("blur", sigma=sigma))
    reference = np.stack(
        [
            [scipy.ndimage.gaussian_filter(img.double().numpy(), sigma, mode="reflect", truncate=4.0) for img in image]
            for image in images
        ]
    )
    reference = torch.from_numpy(reference).float()
    assert (out[mask] - reference[mask]).abs().max() < 1e-5
    assert torch.equal(out[~mask], images[~mask])


def test_fill_registry():
    assert {"mean", "zero", "blur", "road"} <= set(FILLS.names())
    assert "nonexistent" not in FILLS
    assert build_fill("blur").sigma == 2.0


# --------------------------------------------------------------------------------------------- vectorised


class _CountCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _pipeline(b, h, w, granularity):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, h, w, generator=g)
    maps = torch.rand(b, h, w, generator=g) if granularity == "pixel" else torch.rand(b, 3, h, w, generator=g)
    idx = torch.arange(b)
    fills = [build_fill(name, mean=CIFAR_MEAN) for name in ("mean", "zero", "blur")]

    def run():
        r = ranks(maps, idx, 0, granularity)
        masks = [mask_from_ranks(r, t, mode, 3) for t in FRACTIONS for mode in ("roar", "kar")]
        masks.append(removal_mask(maps, idx, 0.5, "roar", 0, granularity))
        for fill in fills:
            ablate(images, masks[0], fill)

    run()  # warm caches (blur matrices) outside the count
    with _CountCalls() as counter:
        run()
    return counter.calls


@pytest.mark.parametrize("granularity", ["pixel", "element"])
def test_no_loop_per_image_or_pixel(granularity):
    """The number of torch calls does not grow with the batch or the image: the work is vectorised."""
    small = _pipeline(1, 4, 5, granularity)
    large = _pipeline(48, 16, 12, granularity)
    assert small == large


def test_top_position_is_the_first_of_the_ranking_with_ties_and_in_any_batch():
    from roar.perturb.ranking import ranking, top_position

    g = torch.Generator().manual_seed(3)
    maps = torch.randint(0, 4, (32, 7, 9), generator=g).float()  # many tied maxima
    maps[0] = 2.0  # a flat map: the tie-break alone decides
    indices = torch.arange(100, 132)
    for seed in (0, 5):
        expected = ranking(maps, indices, seed)[:, 0]
        assert torch.equal(top_position(maps, indices, seed), expected)
        assert torch.equal(top_position(maps[3:4], indices[3:4], seed), expected[3:4])


@pytest.mark.parametrize("levels", [2, 5, 1000])
def test_top_mask_is_the_ranking_cut_at_k_with_ties_and_in_any_batch(levels):
    """The topk shortcut selects exactly the positions the full seeded ranking puts first, for any k
    per image (0, P, and in between), however many values tie at the boundary."""
    from roar.perturb.ranking import ranks, top_mask

    g = torch.Generator().manual_seed(levels)
    maps = torch.randint(0, levels, (24, 6, 7), generator=g).float()
    maps[0] = 1.0  # a flat map: the tie-break alone decides
    indices = torch.arange(50, 74)
    k = torch.randint(0, 43, (24,), generator=g)
    k[1], k[2] = 0, 42
    for seed in (0, 9):
        expected = ranks(maps, indices, seed).flatten(1) < k[:, None]
        got = top_mask(maps, indices, seed, k)
        assert torch.equal(got, expected)
        assert torch.equal(top_mask(maps[5:8], indices[5:8], seed, k[5:8]), expected[5:8])
    assert torch.equal(top_mask(maps, indices, 0, 3).sum(1), torch.full((24,), 3))
