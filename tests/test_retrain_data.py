"""Ablated retraining data: the in-memory and streaming paths agree bit for bit with removal_mask + ablate,
remove or keep exactly the counted positions, visit every image once per epoch, and refuse foreign stores."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import roar.store.format as store_module
from roar.core.errors import RoarError
from roar.data.base import TensorSplit, channel_stats
from roar.perturb import ablate, build_fill, count, removal_mask
from roar.perturb.fills import ConstantFill
from roar.stages.retrain import data as retrain_data
from roar.stages.retrain.data import InMemoryAblatedSource, StreamingAblatedSource, ablated_source
from roar.store import MapStore, StoreWriter

N, C, H, W = 300, 3, 16, 16
P = H * W
CHUNK_ROWS = 32  # 10 store chunks, the last one short (300 = 9·32 + 12)
SEED = 7
CPU = torch.device("cpu")
# Not multiples of 1/255: a replaced value never equals the original it replaces.
ODD_FILL = ConstantFill((0.1234567, 0.7654321, 0.5555555))


def make_split(n: int = N, seed: int = 0, size: int = H) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, C, size, size), dtype=torch.uint8, generator=g)
    return TensorSplit(images, torch.randint(0, 10, (n,), generator=g))


def make_maps(n: int, channels: bool = False) -> dict[str, np.ndarray]:
    """``perm``: a permutation of 0..P−1 per image (a known ranking, no ties); ``blocky``: a 4×4 grid
    upsampled to 16×16 with many exact zeros (ties everywhere, as GradCAM and clipped maps have)."""
    g = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(P, generator=g) for _ in range(n)]).float().view(n, H, W)
    coarse = torch.rand(n, 1, 4, 4, generator=g).sub_(0.4).clamp_(min=0)
    blocky = F.interpolate(coarse, size=(H, W), mode="nearest")[:, 0]
    maps = {"perm": perm, "blocky": blocky}
    if channels:
        maps = {name: m[:, None].repeat(1, C, 1, 1) + torch.rand(n, C, H, W, generator=g) for name, m in maps.items()}
    return {name: m.numpy() for name, m in maps.items()}


def write_store(path, split: TensorSplit, split_name: str = "train", channels: bool = False):
    maps = make_maps(len(split), channels)
    methods = {name: {"method": "test", "params": {}} for name in maps}
    writer = StoreWriter(
        path,
        split=split_name,
        n=len(split),
        geometry=split.geometry,
        dataset="toy",
        dataset_fingerprint=split.fingerprint(),
        model_hash="0" * 16,
        identity={"reduction": "none" if channels else "sum", "target": "label"},
        channels=channels,
        methods=methods,
        provenance={},
        compression=None,
    )
    step = writer.chunk_rows()
    assert step == CHUNK_ROWS
    for start in range(0, len(split), step):
        stop = min(start + step, len(split))
        rows = torch.arange(start, stop)
        batch = {name: m[start:stop] for name, m in maps.items()}
        writer.write(start, batch, split.labels[start:stop], split.labels[start:stop], rows)
    writer.finish()
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A split and its stores (pixel and element maps), chunked into several blocks."""
    root = tmp_path_factory.mktemp("retrain")
    row_bytes = 2 * P  # float16 [H, W]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_module, "CHUNK_BYTES", CHUNK_ROWS * row_bytes)
        split = make_split()
        pixel = write_store(root / "train.h5", split)
        mp.setattr(store_module, "CHUNK_BYTES", CHUNK_ROWS * row_bytes * C)
        element = write_store(root / "element" / "train.h5", split, channels=True)
    return split, pixel, element


def reference(split: TensorSplit, store_path, method, fraction, mode, fill, granularity="pixel") -> torch.Tensor:
    """removal_mask + ablate applied directly to the stored maps of every image."""
    with MapStore.open(store_path) as store:
        maps = torch.from_numpy(store.read(method))
    indices = torch.arange(len(split))
    removed = removal_mask(maps, indices, fraction, mode, SEED, granularity, channels=C)
    return ablate(split.images.float() / 255, removed, fill, indices=indices)


def epoch(source, batch_size=64, generator=None, drop_last=False):
    """Every batch of one epoch: (images, labels, indices) concatenated in the order they came."""
    images, labels, indices = zip(*source.batches(batch_size, generator, drop_last))
    return torch.cat(images), torch.cat(labels), torch.cat(indices)


def by_index(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    out = torch.empty((N, *images.shape[1:]), dtype=images.dtype)
    out[indices] = images
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def source(stores, *, granularity="pixel", method="blocky", fraction=0.3, mode="roar", fill=ODD_FILL, **kw):
    split, pixel, element = stores
    path = element if granularity == "element" else pixel
    return ablated_source(
        split, path, method, fraction, mode, fill, seed=SEED, granularity=granularity, device=CPU, **kw
    )


# --------------------------------------------------------------------------------------------- agreement


@pytest.mark.parametrize(
    ("method", "mode", "fraction", "granularity", "fill"),
    [
        ("blocky", "roar", 0.3, "pixel", ODD_FILL),
        ("blocky", "kar", 0.7, "pixel", "blur"),
        ("perm", "kar", 0.1, "pixel", ODD_FILL),
        ("blocky", "roar", 0.5, "element", ODD_FILL),
        ("blocky", "roar", 0.3, "pixel", "road"),
    ],
)
def test_both_paths_equal_removal_mask_and_ablate_bit_for_bit(stores, method, mode, fraction, granularity, fill):
    split, pixel, element = stores
    fill = build_fill(fill) if isinstance(fill, str) else fill
    path = element if granularity == "element" else pixel
    expected = reference(split, path, method, fraction, mode, fill, granularity)
    kw = {"method": method, "fraction": fraction, "mode": mode, "granularity": granularity, "fill": fill}
    memory = source(stores, **kw)
    assert isinstance(memory, InMemoryAblatedSource)
    g = torch.Generator().manual_seed(3)
    images, labels, indices = epoch(memory, generator=g)
    assert same_bits(by_index(images, indices), expected)
    assert torch.equal(labels, split.labels[indices])
    for workers in (0, 2):
        streamed = source(stores, streaming=True, num_workers=workers, **kw)
        assert isinstance(streamed, StreamingAblatedSource)
        images, labels, indices = epoch(streamed, batch_size=48, generator=torch.Generator().manual_seed(4))
        assert same_bits(by_index(images, indices), expected), f"streaming, {workers} workers"
        assert torch.equal(labels, split.labels[indices])


def test_constant_fill_fast_path_matches_the_generic_one(stores):
    """The arithmetic used for constant fills gives the same bits as ablate's torch.where."""

    class Opaque(ConstantFill):  # same values, but not recognised as a plain ConstantFill
        pass

    idx = torch.randperm(N)[:100]
    fast = source(stores, fill=ODD_FILL)
    slow = source(stores, fill=Opaque(ODD_FILL.value))
    assert fast._value is not None and slow._value is None
    assert same_bits(fast.images_for(idx), slow.images_for(idx))
    assert torch.equal(stores[0].images, make_split().images)  # the split's own tensor was left intact


def test_filled_images_computed_once_equal_the_per_batch_fill(stores, monkeypatch):
    """ROAD and blur images are computed once per source when they fit; the same bits as per batch."""
    import roar.stages.retrain.data as retrain_data

    idx = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:100]
    for name in ("road", "blur"):
        cached = source(stores, fill=build_fill(name))
        monkeypatch.setattr(retrain_data, "FILLED_CACHE_BYTES", 0)
        per_batch = source(stores, fill=build_fill(name))
        monkeypatch.undo()
        assert cached._filled is not None and per_batch._filled is None
        assert same_bits(cached.images_for(idx), per_batch.images_for(idx)), name
        batch = cached.images_for(idx)
        batch.zero_()  # a consumer writing into its batch must not change the cache
        assert same_bits(cached.images_for(idx), per_batch.images_for(idx)), name


# --------------------------------------------------------------------------------------------- exact counts


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_roar_removes_and_kar_keeps_exactly_the_top(stores, fraction):
    split = stores[0]
    k = count(fraction, P)
    original = split.images.float() / 255
    idx = torch.arange(N)
    for method in ("perm", "blocky"):
        with MapStore.open(stores[1]) as store:
            values = torch.from_numpy(store.read(method)).view(N, P)
        for mode in ("roar", "kar"):
            images = source(stores, method=method, fraction=fraction, mode=mode).images_for(idx)
            changed = (images != original).any(dim=1).view(N, P)  # a replaced pixel differs in every channel
            assert torch.equal((images != original).all(dim=1).view(N, P), changed)
            selected = changed if mode == "roar" else ~changed  # ROAR: the removed top; KAR: the kept top
            assert (selected.sum(1) == k).all()
            lowest_selected = values.masked_fill(~selected, float("inf")).min(1).values
            highest_other = values.masked_fill(selected, float("-inf")).max(1).values
            assert (lowest_selected >= highest_other).all()
            if method == "perm":  # no ties: the selected pixels are exactly those written with a value ≥ P − k
                assert torch.equal(selected, torch.from_numpy(make_maps(N)["perm"]).view(N, P) >= P - k)


# --------------------------------------------------------------------------------------------- order


@pytest.mark.parametrize("streaming", [False, True])
def test_every_index_once_per_epoch_in_a_seeded_order(stores, streaming):
    src = source(stores, streaming=streaming, num_workers=0)
    orders = []
    for seed in (5, 5, 6):
        _, _, indices = epoch(src, batch_size=64, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(indices.sort().values, torch.arange(N))
        orders.append(indices)
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])
    assert not torch.equal(orders[0], torch.arange(N))  # shuffled
    _, _, sequential = epoch(src, batch_size=64)
    assert torch.equal(sequential, torch.arange(N))  # no generator (evaluation): split order
    sizes = [len(b[2]) for b in src.batches(64, torch.Generator().manual_seed(5), drop_last=True)]
    assert sizes == [64] * (N // 64)  # the short tail is dropped, every other batch full


def test_streaming_batches_mix_blocks_and_workers_open_the_store_themselves(stores, tmp_path, monkeypatch):
    src = source(stores, streaming=True, num_workers=2)
    log = tmp_path / "opened"

    class Logged(MapStore):
        @classmethod
        def open(cls, path, **kw):
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
            return MapStore.open(path, **kw)

    monkeypatch.setattr(retrain_data, "MapStore", Logged)
    batches = list(src.batches(64, torch.Generator().manual_seed(5)))
    assert all(len(torch.unique(idx // CHUNK_ROWS)) > 1 for _, _, idx in batches)
    openers = [int(line) for line in log.read_text().split()]
    assert len(set(openers)) == 2 and os.getpid() not in openers  # once per worker, never in this process


# --------------------------------------------------------------------------------------------- fill


def test_the_mean_fill_is_the_dataset_mean_in_unit_space(stores):
    split = stores[0]
    mean = channel_stats(split.images)[0]
    fill = build_fill("mean", mean=mean)
    expected = torch.tensor(mean, dtype=torch.float32).view(1, C, 1, 1).expand(N, C, H, W)
    for streaming in (False, True):
        images, _, indices = epoch(source(stores, fraction=1.0, fill=fill, streaming=streaming, num_workers=0))
        assert same_bits(by_index(images, indices), expected.contiguous())
    images = source(stores, fraction=0.3, fill=fill).images_for(torch.arange(N))
    assert images.min() >= 0 and images.max() <= 1
    removed = (images == expected).all(dim=1)
    assert (removed.view(N, P).sum(1) >= count(0.3, P)).all()


# --------------------------------------------------------------------------------------------- refusals


def test_a_store_of_another_split_is_refused(stores, tmp_path):
    split, pixel, element = stores
    args = ("blocky", 0.3, "roar", ODD_FILL)
    cases = [
        (make_split(n=N - 1), {}, f"store holds {N} images, the dataset split has {N - 1}"),
        (make_split(seed=9), {}, "store was made for dataset fingerprint"),
        (make_split(size=8), {}, "store geometry is 3x16x16, the dataset's is 3x8x8"),
        (split, {"split_name": "test"}, "store is for split 'train', asked for 'test'"),
        (split, {"dataset_name": "cifar10"}, "store is for dataset 'toy', asked for 'cifar10'"),
    ]
    for other, kw, words in cases:
        with pytest.raises(RoarError, match=words):
            ablated_source(other, pixel, *args, seed=SEED, device=CPU, **kw)
    ablated_source(split, pixel, *args, seed=SEED, device=CPU, split_name="train", dataset_name="toy")
    with pytest.raises(RoarError, match="no method 'blocky2'"):
        ablated_source(split, pixel, "blocky2", 0.3, "roar", ODD_FILL, seed=SEED, device=CPU)
    with pytest.raises(RoarError, match="element granularity needs one map per channel"):
        ablated_source(split, pixel, *args, seed=SEED, device=CPU, granularity="element")
    with pytest.raises(RoarError, match="pixel granularity needs maps reduced over channels"):
        ablated_source(split, element, *args, seed=SEED, device=CPU)
    with pytest.raises(RoarError, match="no store at .*; run roar extract first"):
        ablated_source(split, tmp_path / "missing.h5", *args, seed=SEED, device=CPU)
    with pytest.raises(ValueError, match="mode must be one of"):
        ablated_source(split, pixel, "blocky", 0.3, "keep", ODD_FILL, seed=SEED, device=CPU)
