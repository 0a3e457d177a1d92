"""ROAD's noisy linear imputation: agrees with a direct sparse solve of the definition, changes removed
pixels only, adds noise of the requested size there, and gives an image the same result in any batch."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch

from benchmarks.road import scipy_impute as fast_reference  # the benchmark's reference, numpy-built
from roar.config import RetrainConfig
from roar.core.errors import RoarError
from roar.perturb import ablate, build_fill, road_impute
from roar.perturb.fills import RoadFill, noise_seed

B, C, H, W = 3, 3, 11, 13  # odd and unequal sides: a transposed axis cannot go unnoticed
OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def reference(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The definition, solved directly: every removed pixel equals the renormalised weighted mean of its
    in-image neighbours (direct 1/6, diagonal 1/12), one sparse system per channel, ``spsolve``.

    ``image`` float64 [C, H, W], ``removed`` bool [C, H, W]; a channel removed entirely is left as is.
    """
    out = image.copy()
    channels, height, width = image.shape
    for c in range(channels):
        pixels = list(zip(*np.nonzero(removed[c])))
        if not pixels or len(pixels) == height * width:
            continue
        index = {p: k for k, p in enumerate(pixels)}
        matrix = scipy.sparse.lil_matrix((len(pixels), len(pixels)))
        rhs = np.zeros(len(pixels))
        for (y, x), k in index.items():
            neighbours = [
                (y + dy, x + dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12)
                for dy, dx in OFFSETS
                if 0 <= y + dy < height and 0 <= x + dx < width
            ]
            total = sum(weight for _, _, weight in neighbours)
            matrix[k, k] = 1.0
            for yy, xx, weight in neighbours:
                if removed[c, yy, xx]:
                    matrix[k, index[(yy, xx)]] -= weight / total
                else:
                    rhs[k] += weight / total * image[c, yy, xx]
        solution = np.atleast_1d(scipy.sparse.linalg.spsolve(matrix.tocsc(), rhs))
        out[c][removed[c]] = solution
    return out


def images(seed: int = 0, b: int = B) -> torch.Tensor:
    return torch.rand(b, C, H, W, generator=torch.Generator().manual_seed(seed))


def random_mask(fraction: float, seed: int = 1, shape=(B, H, W)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < fraction


def border_mask() -> torch.Tensor:
    """The whole border ring (every edge and corner) plus an interior block touching it."""
    m = torch.zeros(B, H, W, dtype=torch.bool)
    m[:, 0], m[:, -1], m[:, :, 0], m[:, :, -1] = True, True, True, True
    m[0, 1:5, 1:6] = True
    m[1, 0:3, 0:3] = True
    m[2] |= random_mask(0.3, seed=5)[2]
    return m


def isolated_mask() -> torch.Tensor:
    """Single pixels, none with a removed neighbour (corners and edges included)."""
    m = torch.zeros(B, H, W, dtype=torch.bool)
    m[:, ::2, ::2] = True
    m[1] = False
    m[1, 0, 0] = m[1, H - 1, W - 1] = m[1, 5, 6] = True
    return m


MASKS = {
    "random 10%": lambda: random_mask(0.1),
    "random 50%": lambda: random_mask(0.5),
    "random 90%": lambda: random_mask(0.9),
    "random 95%": lambda: random_mask(0.95),
    "borders and corners": border_mask,
    "isolated pixels": isolated_mask,
    "per channel": lambda: random_mask(0.6, shape=(B, C, H, W)),
}


def expected(x: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    per_channel = removed if removed.ndim == 4 else removed[:, None].expand(-1, x.shape[1], -1, -1)
    return torch.from_numpy(np.stack([reference(img.double().numpy(), m.numpy()) for img, m in zip(x, per_channel)]))


# --------------------------------------------------------------------------------------------- the solve


@pytest.mark.parametrize("name", list(MASKS))
def test_without_noise_matches_a_direct_sparse_solve(name):
    x, removed = images(), MASKS[name]()
    out = road_impute(x, removed, noise=0)
    assert out.dtype == x.dtype and out.shape == x.shape
    ref = expected(x, removed)
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=0), float((out.double() - ref).abs().max())


def test_positions_not_removed_are_unchanged_bit_for_bit():
    x, removed = images(), random_mask(0.5)
    out = road_impute(x, removed, noise=0.05, generator=torch.Generator().manual_seed(0))
    keep = ~removed[:, None].expand_as(x)
    assert torch.equal(out[keep].view(torch.int32), x[keep].view(torch.int32))
    assert not torch.equal(out[~keep], x[~keep])


def test_noise_is_added_at_removed_positions_only_with_the_requested_std():
    x = torch.rand(8, C, 32, 32, generator=torch.Generator().manual_seed(3))
    removed = random_mask(0.5, seed=4, shape=(8, 32, 32))
    clean = road_impute(x, removed, noise=0)
    noisy = road_impute(x, removed, noise=0.05, generator=torch.Generator().manual_seed(5))
    at = removed[:, None].expand_as(x)
    assert torch.equal(noisy[~at], clean[~at])
    delta = (noisy[at] - clean[at]).double()
    n = delta.numel()  # about 12 000 draws: the sample std is within 1 % of σ (1 sd), tolerance 10 %
    assert n > 10_000
    assert abs(float(delta.std()) / 0.05 - 1) < 0.1
    assert abs(float(delta.mean())) < 5 * 0.05 / n**0.5


def test_a_plane_removed_entirely_gets_the_fallback():
    x = images()
    removed = random_mask(0.5)
    removed[1] = True  # image 1: every pixel, every channel
    out = road_impute(x, removed, noise=0, fallback=(0.1, 0.2, 0.3))
    assert torch.equal(out[1], torch.tensor([0.1, 0.2, 0.3]).view(C, 1, 1).expand(C, H, W))
    assert torch.allclose(out[[0, 2]].double(), expected(x[[0, 2]], removed[[0, 2]]), atol=1e-4, rtol=0)
    # Per channel: only channel 2 of image 0 is removed entirely; the default fallback is 0.5.
    per_channel = random_mask(0.5, shape=(B, C, H, W))
    per_channel[0, 2] = True
    out = road_impute(x, per_channel, noise=0)
    assert torch.equal(out[0, 2], torch.full((H, W), 0.5))
    ref = expected(x, per_channel)
    others = torch.ones(B, C, dtype=torch.bool)
    others[0, 2] = False
    assert torch.allclose(out[others].double(), ref[others], atol=1e-4, rtol=0)


def test_a_constant_image_stays_constant():
    """Constants are harmonic: the weighted mean of equal neighbours is that value, whatever the mask."""
    values = torch.tensor([0.0, 0.37, 1.0])
    x = values.view(1, C, 1, 1).expand(B, C, H, W).contiguous()
    for removed in (random_mask(0.9), border_mask(), random_mask(0.5, shape=(B, C, H, W))):
        out = road_impute(x, removed, noise=0)
        assert torch.allclose(out, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_float_types_keep_their_type_and_known_values(dtype):
    """The solve runs in float32 whatever the images' type; the known values come back bit for bit."""
    x, removed = images().to(dtype), random_mask(0.7)
    out = road_impute(x, removed, noise=0.01, generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype
    keep = ~removed[:, None].expand_as(x)
    assert torch.equal(bits(out)[keep], bits(x)[keep])
    clean = road_impute(x, removed, noise=0)
    atol = 1e-5 if dtype == torch.float64 else 1e-3  # float16 itself resolves ~5e-4 near 1
    assert torch.allclose(clean.double(), expected(x, removed), atol=atol, rtol=0)


def test_odd_values_stay_where_they_are_known_and_do_not_leak_where_removed():
    """−0.0 known values are returned as −0.0; NaN or inf at removed positions are ignored."""
    x, removed = images(), random_mask(0.4)
    x[~removed[:, None].expand_as(x)] = -0.0
    x[removed[:, None].expand_as(x)] = float("nan")
    x[0, 0][removed[0]] = float("inf")
    out = road_impute(x, removed, noise=0)
    keep = ~removed[:, None].expand_as(x)
    assert torch.equal(bits(out)[keep], bits(x)[keep])
    assert bool(torch.isfinite(out).all())
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-6, rtol=0)  # the solution for all-zero knowns


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def hard_masks(size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    masks = {f"random {p:.0%}": torch.rand(size, size, generator=generator) < p for p in (0.9, 0.99)}
    ring = torch.zeros(size, size, dtype=torch.bool)
    ring[1:-1, 1:-1] = True
    hole = torch.zeros(size, size, dtype=torch.bool)
    hole[size // 8 : size - size // 8, size // 8 : size - size // 8] = True
    row = torch.ones(size, size, dtype=torch.bool)
    row[-1] = False
    corner = torch.ones(size, size, dtype=torch.bool)
    corner[0, 0] = False
    masks.update(
        {"all but the border": ring, "a centred hole": hole, "all but one row": row, "all but a corner": corner}
    )
    return masks


@pytest.mark.parametrize("size", [32, 96])
def test_the_error_stays_below_1e_5_on_the_hardest_masks(size):
    """The tolerance's guarantee, with margin: large holes (the worst conditioned systems) and nearly
    full masks, 32×32 and a size above the 1024 pixels at which the tolerance starts tightening."""
    masks = hard_masks(size)
    removed = torch.stack(list(masks.values()))
    x = torch.rand(len(removed), C, size, size, generator=torch.Generator().manual_seed(12))
    out = road_impute(x, removed, noise=0).double().numpy()
    for k, name in enumerate(masks):
        ref = fast_reference(x[k].double().numpy(), removed[k].numpy())
        error = float(np.abs(out[k] - ref).max())
        assert error < 1e-5, (name, error)


# --------------------------------------------------------------------------------------------- routes


def separated_groups(size: int = 48) -> tuple[torch.Tensor, list[int]]:
    """One plane holding groups of 1–16 removed pixels of many shapes (lines, blocks, diagonals: 8-connected
    only), corners and edges included, none touching another; and the group sizes."""
    m = torch.zeros(size, size, dtype=torch.bool)
    m[0, 0] = m[size - 1, size - 1] = True  # corners, alone
    m[0, 10:13] = True  # a line on the top edge
    m[size - 1, 20:22] = True  # a pair on the bottom edge
    for k in range(6):
        m[3 + k, 3 + k] = True  # a diagonal of 6: connected through corners only
    m[3:7, 20:24] = True  # a 4×4 block: 16 pixels
    m[12, 2:18] = True  # a line of 16: the longest a group may be and still be solved directly
    m[20:23, 30:33] = True
    m[21, 31] = False  # a ring of 8
    m[30, 0] = m[31, 1] = m[32, 0] = True  # a zig-zag on the left edge
    from scipy.ndimage import label

    labels, count = label(m.numpy(), structure=np.ones((3, 3)))
    return m, sorted(np.bincount(labels.ravel())[1:].tolist())


def test_small_groups_are_solved_directly_and_exactly(monkeypatch):
    """Groups of up to 16 pixels never reach the iterative solve, and their solution is the float64
    direct solve's rounded to float32 (no tolerance involved)."""
    from roar.perturb.road import grid

    mask, sizes = separated_groups()
    assert max(sizes) == 16 and 1 in sizes and len(sizes) >= 9
    monkeypatch.setattr(grid, "solve_planes", lambda *a, **k: pytest.fail("a small group was iterated"))
    x = torch.rand(2, C, *mask.shape, generator=torch.Generator().manual_seed(21))
    removed = torch.stack([mask, mask.flip(0)])
    out = road_impute(x, removed, noise=0)
    ref = expected(x, removed)
    assert float((out.double() - ref).abs().max()) < 2e-7
    per_channel = torch.stack([mask, mask.T, mask.flip(1)])[None].expand(2, C, *mask.shape)
    out = road_impute(x, per_channel, noise=0)
    assert float((out.double() - expected(x, per_channel)).abs().max()) < 2e-7


def test_a_group_above_16_pixels_sends_its_plane_to_the_sparse_factorisation(monkeypatch):
    """A plane with few removed pixels but a larger group (a blob, as attribution maps remove) is factorised
    exactly, never iterated; the other planes of the batch keep their direct solve."""
    from roar.perturb.road import grid, sparse

    mask, _ = separated_groups()
    long = mask.clone()
    long[12, 2:19] = True  # the line of 16 grows to 17
    calls = []
    original = sparse.solve_planes
    monkeypatch.setattr(sparse, "solve_planes", lambda v, *a, **k: calls.append(len(v)) or original(v, *a, **k))
    monkeypatch.setattr(grid, "solve_planes", lambda *a, **k: pytest.fail("a sparse plane was iterated"))
    x = torch.rand(2, C, *mask.shape, generator=torch.Generator().manual_seed(22))
    removed = torch.stack([mask, long])
    out = road_impute(x, removed, noise=0)
    assert calls == [1]  # one image, its 3 channels as right-hand sides
    assert float((out.double() - expected(x, removed)).abs().max()) < 2e-7
    # Per-channel masks: one plane per channel.
    calls.clear()
    out = road_impute(x, torch.stack([mask, long, mask])[None].expand(2, C, *mask.shape), noise=0)
    assert calls == [2]


def test_only_planes_removing_over_a_quarter_are_iterated(monkeypatch):
    from roar.perturb.road import grid

    calls = []
    original = grid.solve_planes
    monkeypatch.setattr(grid, "solve_planes", lambda v, *a, **k: calls.append(len(v)) or original(v, *a, **k))
    x = torch.rand(3, C, 16, 16, generator=torch.Generator().manual_seed(26))
    removed = torch.zeros(3, 16, 16, dtype=torch.bool)
    removed[0, 2:10, 2:10] = True  # 64 of 256: a quarter, a blob → factorised
    removed[1, 2:10, 2:11] = True  # 72: over a quarter → iterated
    removed[2, ::3, ::3] = True  # scattered → direct
    out = road_impute(x, removed, noise=0)
    assert calls == [C]
    assert float((out.double() - expected(x, removed)).abs().max()) < 1e-5


def test_the_routes_agree_with_the_peer_at_imagenet_size():
    """224×224, random masks from 1 % (direct) to 50 % (iterated): within 1e-5 of the ROAD authors'
    imputer as pytorch-grad-cam ships it (float64 ``spsolve``), noise off."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    peer = NoisyLinearImputer(noise=0.0)
    generator = torch.Generator().manual_seed(23)
    fractions = (0.01, 0.1, 0.5)
    x = torch.rand(len(fractions), C, 224, 224, generator=generator)
    removed = torch.stack([torch.rand(224, 224, generator=generator) < p for p in fractions])
    out = road_impute(x, removed, noise=0)
    for k in range(len(fractions)):
        theirs = peer(x[k], (~removed[k]).float())  # the peer's mask: 1 where a pixel is kept
        assert float((out[k] - theirs).abs().max()) < 1e-5, fractions[k]


def test_a_pixel_mask_and_its_per_channel_copy_give_the_same_bits():
    """The same systems and the same draws, (channel, row, column) per image, whichever form the mask has."""
    x = torch.rand(3, C, 24, 24, generator=torch.Generator().manual_seed(24))
    removed = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(25)) < torch.tensor([0.05, 0.3, 0.9]).view(
        3, 1, 1
    )

    def generators():
        return [torch.Generator().manual_seed(200 + i) for i in range(3)]

    pixel = road_impute(x, removed, generator=generators())
    channel = road_impute(x, removed[:, None].expand(3, C, 24, 24), generator=generators())
    assert torch.equal(bits(pixel), bits(channel))


def test_groups_are_labelled_as_scipy_labels_them_and_a_slow_plane_is_unsettled(monkeypatch):
    """The labelling behind the direct route: the same 8-connected groups as ``scipy.ndimage.label``, each
    carrying its smallest index; a plane still changing after the allowed rounds is named, not guessed."""
    from scipy.ndimage import label as scipy_label

    from roar.perturb.road import direct

    mask = torch.rand(2, 40, 40, generator=torch.Generator().manual_seed(27)) < 0.3
    mask[1, 20, :] = True  # a long line: many rounds without shortcuts
    flat = mask.reshape(-1).nonzero()[:, 0]
    plane, y, x = flat // 1600, flat % 1600 // 40, flat % 40
    index = {(int(p), int(a), int(b)): k for k, (p, a, b) in enumerate(zip(plane, y, x))}
    links = torch.tensor(
        [
            [
                index.get((int(p), int(a) + dy, int(b) + dx), k) if 0 <= b + dx < 40 else k
                for dy, dx, _ in direct.NEIGHBOURS
            ]
            for k, (p, a, b) in enumerate(zip(plane, y, x))
        ]
    )
    label, unsettled = direct._groups(links, plane)
    assert len(unsettled) == 0
    theirs = np.concatenate(
        [scipy_label(m, structure=np.ones((3, 3)))[0][m] + 10_000 * i for i, m in enumerate(mask.numpy())]
    )
    ours = label.numpy()
    assert len(set(zip(ours, theirs))) == len(set(ours)) == len(set(theirs))  # the same partition
    assert all(ours[k] == min(np.flatnonzero(ours == ours[k])) for k in range(len(ours)))  # the smallest index
    monkeypatch.setattr(direct, "LARGEST", 1)  # one round: the line's plane cannot settle
    _, unsettled = direct._groups(links, plane)
    assert 1 in unsettled.tolist()


def test_the_road_fill_records_the_revision_of_its_numbers():
    """Results computed with the earlier numbers (noise drawn for every pixel, one iterative solver) are
    recomputed on a rerun: the fill's settings, which every result records, name the revision."""
    from roar.stages.reuse import Reuse

    current = RetrainConfig(fill={"name": "road"}).fill.model_dump(mode="json")
    assert current["numerics"] == 2
    earlier = {k: v for k, v in current.items() if k != "numerics"}
    reuse = Reuse()
    assert not reuse.fresh("random", {"retrain": {"fill": earlier}}, {"retrain": {"fill": current}})
    assert "retrain.fill.numerics" in reuse.why()
    with pytest.raises(Exception, match="numerics"):
        RetrainConfig(fill={"name": "road", "numerics": 1})


# --------------------------------------------------------------------------------------------- noise, batches


def test_reproducible_with_a_seeded_generator():
    x, removed = images(), random_mask(0.5)

    def run(seed):
        return road_impute(x, removed, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("per_channel", [False, True])
def test_batch_results_equal_per_image_results_bit_for_bit(per_channel):
    """With a generator per image, an image's result is independent of its batch and position."""
    x = torch.rand(7, C, 16, 16, generator=torch.Generator().manual_seed(8))
    shape = (7, C, 16, 16) if per_channel else (7, 16, 16)
    removed = torch.rand(shape, generator=torch.Generator().manual_seed(9)) < torch.linspace(0.05, 0.97, 7).view(
        7, *[1] * (len(shape) - 1)
    )

    def generators(rows):
        return [torch.Generator().manual_seed(100 + int(i)) for i in rows]

    batch = road_impute(x, removed, generator=generators(range(7)))
    for i in range(7):
        alone = road_impute(x[i : i + 1], removed[i : i + 1], generator=generators([i]))
        assert torch.equal(bits(alone), bits(batch[i : i + 1])), i
    order = torch.tensor([5, 2, 6, 0])
    shuffled = road_impute(x[order], removed[order], generator=generators(order))
    assert torch.equal(bits(shuffled), bits(batch[order]))


def test_chunks_and_dropping_finished_planes_do_not_change_a_result(monkeypatch):
    """Planes are solved in chunks of whole images, and a chunk drops its finished planes midway: neither
    which planes share a chunk nor at which row a plane ends up changes a bit of its result."""
    from roar.perturb.road import direct, grid

    x = torch.rand(9, C, 20, 20, generator=torch.Generator().manual_seed(13))
    fractions = torch.tensor([0.02, 0.97, 0.1, 0.5, 0.9, 0.05, 0.7, 0.3, 0.99]).view(9, 1, 1)
    removed = torch.rand(9, 20, 20, generator=torch.Generator().manual_seed(14)) < fractions
    default = road_impute(x, removed, noise=0)
    monkeypatch.setattr(grid, "COMPACT", 0.0)  # never drop
    never = road_impute(x, removed, noise=0)
    monkeypatch.setattr(grid, "COMPACT", 0.99)  # drop at every iteration
    always = road_impute(x, removed, noise=0)
    monkeypatch.setattr(grid, "CHUNK_VALUES", 1)  # one plane per chunk
    alone = road_impute(x, removed, noise=0)
    monkeypatch.setattr(direct, "CHUNK_PIXELS", 1)  # the direct route: one plane per chunk as well
    direct_alone = road_impute(x, removed, noise=0)
    for other in (never, always, alone, direct_alone):
        assert torch.equal(bits(other), bits(default))


def test_errors_are_clear():
    x = images()
    with pytest.raises(ValueError, match="bool"):
        road_impute(x, random_mask(0.5).float())
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        road_impute(x, random_mask(0.5, shape=(B, H, W + 1)))
    with pytest.raises(ValueError, match="fallback"):
        road_impute(x, random_mask(0.5), fallback=(0.5, 1.5, 0.5))
    with pytest.raises(RoarError, match="did not reach"):
        road_impute(x, random_mask(0.95), noise=0, max_iter=2)


# --------------------------------------------------------------------------------------------- the fill


def test_the_road_fill_through_build_fill_and_ablate():
    mean = (0.2, 0.4, 0.6)
    x, removed = images(), random_mask(0.5)[:, None]  # [B, 1, H, W], as the ablation masks come
    removed[2] = True
    indices = torch.tensor([10, 11, 12])
    fill = build_fill("road", mean=mean)
    assert isinstance(fill, RoadFill) and fill.noise == 0.01
    out = ablate(x, removed, fill, indices=indices)

    # The definition plus each image's own noise, drawn from (seed 0, dataset index).
    def generators():
        return [torch.Generator().manual_seed(noise_seed(0, int(i))) for i in indices]

    assert torch.equal(out, road_impute(x, removed[:, 0], 0.01, generators(), mean))
    draws = torch.randn(C, H, W, generator=generators()[2])  # one per removed value, (channel, row, column)
    assert torch.equal(out[2], torch.tensor(mean).view(C, 1, 1) + 0.01 * draws)  # removed entirely: the mean
    clean = ablate(x, removed, build_fill("road", mean=mean, noise=0))
    assert torch.allclose(clean[:2].double(), expected(x[:2], removed[:2, 0]), atol=1e-4, rtol=0)
    # Another seed, another noise; the same seed and index, the same noise in any batch.
    assert not torch.equal(ablate(x, removed, build_fill("road", seed=1), indices=indices), out)
    alone = ablate(x[1:2], removed[1:2], build_fill("road", mean=mean), indices=indices[1:2])
    assert torch.equal(alone, out[1:2])


def test_the_road_fill_config():
    assert RetrainConfig(fill={"name": "road", "noise": 0.02, "seed": 3}).fill.name == "road"
    fill = build_fill("road", mean=(0.5, 0.5, 0.5), noise=0.02, fallback=[0.1, 0.2, 0.3], seed=3)
    assert (fill.noise, fill.fallback, fill.seed) == (0.02, (0.1, 0.2, 0.3), 3)
    assert build_fill("road").fallback is None  # no dataset mean: road_impute's 0.5
    with pytest.raises(RoarError, match="noise"):
        build_fill("road", noise=-0.1)
    with pytest.raises(RoarError, match="fallback"):
        build_fill("road", fallback=[0.5, 2.0, 0.5])
    with pytest.raises(RoarError, match="unknown key 'nosie'"):
        build_fill("road", nosie=0.1)


def test_the_solve_runs_on_one_cpu_thread_and_restores_the_setting(monkeypatch):
    import roar.perturb.road as road

    seen = []
    original = road._impute
    monkeypatch.setattr(road, "_impute", lambda *a, **k: seen.append(torch.get_num_threads()) or original(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        road_impute(images(), random_mask(0.5), noise=0)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
