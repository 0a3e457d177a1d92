"""The ablated data that ROAR/KAR retraining reads: batch sources over a split and its stored maps.

``ablated_source`` returns a source with the interface of ``roar.training.sources``
(``len(source)``, ``source.batches(batch_size, generator, drop_last)`` yielding ``(images float
[B, C, H, W] in [0, 1] on the device, labels, indices on the CPU)``), so ``fit`` and ``evaluate``
retrain and test on ablated images exactly as they train the base model. The order of operations
is the protocol's: the split's images at their evaluation geometry (the one the maps were computed
at) → ablation → train-time augmentation (inside ``fit``) → normalisation (inside the model).

Two paths give bit-identical images for the same indices, both equal to ``removal_mask`` +
``ablate`` applied to the stored maps:

* **In memory** (CIFAR-sized splits). A source ablates with one fraction and mode, so the removal
  mask of every image is computed once, chunk by chunk from the store, and kept on the device
  (one byte per position): a batch never ranks or sorts again. With a constant fill (``mean``,
  ``zero``) the removed positions are also zeroed once in the uint8 copy, and a batch costs a
  gather, the uint8 → [0, 1] division and one fused multiply-add (``0/255 + 1·v = v`` and
  ``x + 0·v = x`` exactly), which on the CPU is cheaper than a ``torch.where`` over a boolean
  mask. Other fills (ROAD, blur) are applied once to every image when the result fits in
  ``FILLED_CACHE_BYTES``, and per batch through ``ablate`` otherwise.
* **Streaming** (ImageNet-sized splits). A DataLoader whose workers each open the HDF5 file
  themselves, on first use after the fork (an h5py handle must never cross a process boundary),
  and read whole store chunks: one HDF5 read per item, never a scattered row gather. Blocks are
  visited in a random order and rows shuffled within windows of several batches, so a batch
  mixes many blocks. The main process ranks the maps on the device with the same function and
  seed as the in-memory path, then applies the fill.

The maps are the store's dequantised float32 values (``MapStore.read``) in both paths, and
ties are broken by the seeded per-(image, position) key of ``roar.perturb.ranking``, which does
not depend on batch composition: that is what makes the two paths agree bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from roar.core.device import pin_memory
from roar.core.errors import RoarError
from roar.data.base import ImageSplit
from roar.perturb.fills import ConstantFill, ablate
from roar.perturb.ranking import GRANULARITIES, MODES, count, mask_from_ranks, ranks
from roar.stages.extract import RERUN as EXTRACT
from roar.store import MapStore
from roar.store.hdf5 import chunk_rows_of
from roar.training.sources import _batch_slices, _permutation

Fill = Callable[..., torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

FILLED_CACHE_BYTES = 2 << 30
"""In memory with a fill other than a constant: the ablated float32 images are computed once when they
take at most this much (CIFAR-10's 50,000 training images: 0.6 GiB), else per batch."""
FILL_ROWS = 256
"""Images ablated per call while that cache is built."""

SHUFFLE_BATCHES = 8
"""Streaming: rows are shuffled within windows of this many batches (whole store chunks, at least one)."""


# --------------------------------------------------------------------------------------------- shared


def _to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1]: the same bits as ``images.float().div_(255)`` (one pass instead of two)."""
    return torch.div(images_u8, 255)


def _masks(maps: torch.Tensor, indices: torch.Tensor, fraction: float, mode: str, seed: int, granularity: str):
    """bool removal masks [k, 1, H, W] (pixel) or [k, C, H, W] (element) of maps of split rows ``indices``."""
    return mask_from_ranks(ranks(maps, indices, seed, granularity), fraction, mode)


def _constant_value(fill: Fill, channels: int, device: torch.device) -> torch.Tensor | None:
    """The float32 per-channel value of a constant fill when the arithmetic fast path is exact, else None.

    ``x·(1 − m) + m·v`` written as ``x + m·v`` on an image whose removed positions are zero equals
    ``torch.where(m, v, x)`` for every finite v except −0 (0 + −0 is +0), so those fall back to ``ablate``.
    """
    if type(fill) is not ConstantFill:
        return None
    value = torch.tensor(fill.value, dtype=torch.float32)
    if len(fill.value) not in (1, channels):
        raise ValueError(f"the fill has {len(fill.value)} channel values for images with {channels} channels")
    if not torch.isfinite(value).all() or bool(((value == 0) & torch.signbit(value)).any()):
        return None
    return value.view(1, -1, 1, 1).to(device)


def _check_args(fraction: float, mode: str, granularity: str, fill: Fill) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    count(fraction, 1)  # validates the fraction before any map is read
    if not callable(fill):
        raise TypeError(f"fill must be a fill callable (see roar.perturb.fills.build_fill), got {fill!r}")


def check_granularity(store: MapStore, granularity: str) -> None:
    """RoarError if the store's maps do not suit the granularity: one per channel for 'element', reduced for 'pixel'."""
    if granularity == "pixel" and store.channels:
        raise RoarError(
            f"{store.path} keeps one map per channel; pixel granularity needs maps reduced over channels "
            "(use granularity 'element' or a store extracted with a reduction)"
        )
    if granularity == "element" and not store.channels:
        raise RoarError(
            f"{store.path} holds maps reduced over channels; element granularity needs one map per channel "
            "(use granularity 'pixel' or extract with reduction 'none')"
        )


def _validated_layout(
    split: ImageSplit,
    store_path: Path,
    method: str,
    granularity: str,
    dataset_name: str | None,
    split_name: str | None,
) -> int:
    """Refuse a store that was not made from this split (RoarError naming the difference); its chunk rows.

    The store is opened and closed here, in the calling process: workers open their own handles.
    """
    with MapStore.open(store_path, rerun=EXTRACT) as store:
        store.validate_for(
            dataset=dataset_name if dataset_name is not None else store.attrs["dataset"],
            split=split_name if split_name is not None else store.split,
            n=len(split),
            geometry=split.geometry,
            dataset_fingerprint=split.fingerprint(),
        )
        store.method_info(method)  # RoarError naming the stored methods if this one is missing
        check_granularity(store, granularity)
        if not np.array_equal(store.indices, np.arange(store.n)):
            raise RoarError(f"{store_path}: its rows are not the split's images in order; rerun 'roar extract'")
    with h5py.File(store_path, "r") as f:
        return chunk_rows_of(f["maps"][method])


# --------------------------------------------------------------------------------------------- in memory


class InMemoryAblatedSource:
    """The split's images and their removal masks on the device; a batch is a gather and a fill.

    ``removed`` bool [N, 1, H, W] (pixel) or [N, C, H, W] (element): True where an image is replaced.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, removed: torch.Tensor, fill: Fill, device):
        self.device = torch.device(device)
        self.labels = labels.to(self.device)
        self.fill = fill
        self.channels = images.shape[1]
        self._removed = removed.to(self.device)
        self._value = _constant_value(fill, self.channels, self.device)
        images = images.to(self.device)
        self._filled = None
        if self._value is not None:
            # Zero the removed positions once (out of place: the split's tensor stays intact); a batch then
            # adds m·v, and the originals are not needed.
            self._images = images.masked_fill(self._removed, 0)
            self._removed_u8 = self._removed.to(torch.uint8)
        else:
            self._images = images
            if images.numel() * 4 <= FILLED_CACHE_BYTES:
                # A fill's value for an image depends only on the image, its mask and its index (the contract
                # that makes both data paths agree), so every epoch would recompute the same values:
                # compute them once (ROAD's solve costs as much as a training step otherwise).
                rows = torch.arange(len(images))
                self._filled = torch.cat([self._ablate(part) for part in rows.split(FILL_ROWS)])

    def __len__(self) -> int:
        return len(self.labels)

    def removed_for(self, indices: torch.Tensor) -> torch.Tensor:
        """bool removal masks [B, C, H, W] of split rows ``indices`` (e.g. for a mask-only leakage check)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).to(self.device)
        return self._removed.index_select(0, idx).expand(-1, self.channels, -1, -1)

    def images_for(self, indices: torch.Tensor) -> torch.Tensor:
        """Ablated images float [B, C, H, W] in [0, 1] of split rows ``indices``, on the device."""
        idx_cpu = torch.as_tensor(indices, dtype=torch.int64).cpu()
        idx = idx_cpu.to(self.device)
        if self._value is not None:
            images = _to_unit(self._images.index_select(0, idx))
            return images.addcmul_(self._removed_u8.index_select(0, idx).to(images.dtype), self._value)
        if self._filled is not None:
            return self._filled.index_select(0, idx)
        return self._ablate(idx_cpu)

    def _ablate(self, idx_cpu: torch.Tensor) -> torch.Tensor:
        idx = idx_cpu.to(self.device)
        images = _to_unit(self._images.index_select(0, idx))
        return ablate(images, self.removed_for(idx), self.fill, indices=idx_cpu)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[Batch]:
        """The same order as ``InMemorySource`` for the same generator (sequential without one)."""
        order = _permutation(len(self), generator)
        for idx in _batch_slices(order, batch_size, drop_last):
            idx_dev = idx.to(self.device)
            yield self.images_for(idx), self.labels.index_select(0, idx_dev), idx


def _all_images(split: ImageSplit) -> torch.Tensor:
    if split.images is not None:
        return split.images
    return torch.stack([torch.as_tensor(split[i][0], dtype=torch.uint8) for i in range(len(split))])


def _removal_masks(store_path, method, n, fraction, mode, seed, granularity, device) -> torch.Tensor:
    """Removal masks of every row, ranked one store chunk at a time on the device."""
    removed = None
    done = 0
    with MapStore.open(store_path, rerun=EXTRACT) as store:
        for start, chunk in store.read_chunks(method):
            maps = torch.from_numpy(chunk).to(device)
            indices = torch.arange(start, start + len(chunk))
            mask = _masks(maps, indices, fraction, mode, seed, granularity)
            if removed is None:
                removed = torch.empty((n, *mask.shape[1:]), dtype=torch.bool, device=device)
            removed[start : start + len(chunk)] = mask
            done += len(chunk)
    if removed is None or done != n:
        raise RoarError(f"{store_path}: method '{method}' has {done} of {n} rows; rerun 'roar extract'")
    return removed


# --------------------------------------------------------------------------------------------- streaming


class _Blocks(torch.utils.data.Dataset):
    """Item b: ``(b, uint8 images, labels, float32 maps)`` of store rows [b·rows, min((b + 1)·rows, N)).

    The store is opened lazily by whichever process reads first and reopened if that process is a
    fork of the one that opened it, so no HDF5 handle is ever shared between processes.
    """

    def __init__(self, split: ImageSplit, store_path: Path, method: str, rows: int):
        self.split, self.store_path, self.method, self.rows = split, store_path, method, rows
        self.n = len(split)
        self._store: MapStore | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return math.ceil(self.n / self.rows)

    def _reader(self) -> MapStore:
        if self._store is None or self._pid != os.getpid():
            self._store = MapStore.open(self.store_path, rerun=EXTRACT)
            self._pid = os.getpid()
        return self._store

    def __getitem__(self, block: int):
        start, stop = block * self.rows, min((block + 1) * self.rows, self.n)
        maps = torch.from_numpy(self._reader().read(self.method, start, stop))
        if self.split.images is not None:
            # A copy, so that only these rows (not the whole split's storage) travel to the main process.
            images = self.split.images[start:stop].clone()
        else:
            images = torch.stack([torch.as_tensor(self.split[i][0], dtype=torch.uint8) for i in range(start, stop)])
        return block, images, self.split.labels[start:stop].clone(), maps

    def close(self) -> None:
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._store, self._pid = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_pid": None}


class StreamingAblatedSource:
    """Ablated batches of a split that does not fit in memory, read block by block from the store."""

    def __init__(
        self,
        split: ImageSplit,
        store_path: Path,
        method: str,
        rows: int,
        fraction: float,
        mode: str,
        fill: Fill,
        seed: int,
        granularity: str,
        device,
        num_workers: int = 2,
        shuffle_batches: int = SHUFFLE_BATCHES,
    ):
        self.blocks = _Blocks(split, store_path, method, rows)
        self.rows, self.n = rows, len(split)
        self.fraction, self.mode, self.fill, self.seed, self.granularity = fraction, mode, fill, seed, granularity
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.shuffle_batches = shuffle_batches

    def __len__(self) -> int:
        return self.n

    def _plan(self, batch_size: int, generator: torch.Generator | None) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Windows of whole blocks and each window's row permutation, all drawn before the first batch,
        so the order does not depend on what the consumer draws from the same generator in between."""
        n_blocks = len(self.blocks)
        order = _permutation(n_blocks, generator).tolist()
        target = max(1, batch_size * self.shuffle_batches)
        windows, current, size = [], [], 0
        for block in order:
            current.append(block)
            size += min(self.rows, self.n - block * self.rows)
            if size >= target:
                windows.append(current)
                current, size = [], 0
        if current:
            windows.append(current)
        perms = []
        for window in windows:
            size = sum(min(self.rows, self.n - b * self.rows) for b in window)
            perms.append(torch.randperm(size, generator=generator) if generator is not None else torch.arange(size))
        return windows, perms

    def _window(self, items: list, perm: torch.Tensor, batch_size: int):
        """(images uint8, labels, removal masks, indices) of one window on the device, in shuffled order."""
        indices = torch.cat([torch.arange(b * self.rows, b * self.rows + len(lab)) for b, _, lab, _ in items])
        images = torch.cat([img for _, img, _, _ in items]).to(self.device, non_blocking=True)
        labels = torch.cat([lab for _, _, lab, _ in items]).to(self.device, non_blocking=True)
        maps = torch.cat([m for _, _, _, m in items])
        indices, maps = indices[perm], maps[perm]
        perm_dev = perm.to(self.device)
        images, labels = images.index_select(0, perm_dev), labels.index_select(0, perm_dev)
        step = max(1, batch_size)  # ranking memory grows with rows × positions: one batch at a time
        removed = torch.cat(
            [
                _masks(
                    maps[a : a + step].to(self.device, non_blocking=True),
                    indices[a : a + step],
                    self.fraction,
                    self.mode,
                    self.seed,
                    self.granularity,
                )
                for a in range(0, len(indices), step)
            ]
        )
        return images, labels, removed, indices

    def _ablated(self, images_u8: torch.Tensor, removed: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        images = _to_unit(images_u8)
        return ablate(images, removed.expand(-1, images.shape[1], -1, -1), self.fill, indices=indices)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[Batch]:
        windows, perms = self._plan(batch_size, generator)
        loader = torch.utils.data.DataLoader(
            self.blocks,
            batch_size=None,
            sampler=[b for window in windows for b in window],
            num_workers=self.num_workers,
            pin_memory=pin_memory(self.device),
            persistent_workers=False,
        )
        # A short last batch is dropped on the same condition as in roar.training.sources.
        keep_tail = not (drop_last and self.n > batch_size)
        carry: list[tuple] = []
        carried = 0
        items = iter(loader)
        try:
            for window, perm in zip(windows, perms):
                parts = [next(items) for _ in window]
                if [int(p[0]) for p in parts] != window:
                    raise RuntimeError("the block loader returned blocks out of order")
                images, labels, removed, indices = self._window(parts, perm, batch_size)
                at = 0
                if carried:  # complete the batch begun in the previous window
                    need = batch_size - carried
                    carry.append((images[:need], labels[:need], removed[:need], indices[:need]))
                    at = need
                    if carried + len(indices) < batch_size:
                        carried += len(indices)
                        continue
                    yield self._batch([torch.cat(t) for t in zip(*carry)])
                    carry, carried = [], 0
                while at + batch_size <= len(indices):
                    sl = slice(at, at + batch_size)
                    yield self._batch([images[sl], labels[sl], removed[sl], indices[sl]])
                    at += batch_size
                if at < len(indices):
                    carry = [(images[at:], labels[at:], removed[at:], indices[at:])]
                    carried = len(indices) - at
            if carried and keep_tail:
                yield self._batch([torch.cat(t) for t in zip(*carry)])
        finally:
            del items
            self.blocks.close()

    def _batch(self, parts: list[torch.Tensor]) -> Batch:
        images, labels, removed, indices = parts
        return self._ablated(images, removed, indices), labels, indices


# --------------------------------------------------------------------------------------------- entry


def ablated_source(
    split: ImageSplit,
    store_path: str | Path,
    method: str,
    fraction: float,
    mode: str,
    fill: Fill,
    *,
    seed: int,
    granularity: str = "pixel",
    device,
    streaming: bool | None = None,
    num_workers: int = 2,
    dataset_name: str | None = None,
    split_name: str | None = None,
):
    """A batch source (``len``, ``.batches(batch_size, generator, drop_last)``) of ``split`` ablated by
    ``method``'s maps in the store at ``store_path``.

    ``mode`` ``roar`` replaces the top ``fraction`` of each image's positions, ``kar`` keeps them and
    replaces the rest (``morf``/``lerf`` as in ``roar.perturb.ranking``); ``fill`` is a fill from
    ``roar.perturb.fills`` (the protocol's: ``build_fill("mean", mean=dataset.mean)``); ``seed``
    breaks ties between equal map values and must be the seed the maps are evaluated with everywhere.

    The store is checked against the split first (and against ``dataset_name`` and ``split_name``
    when given): a store made for another split, size, geometry or dataset fingerprint is a
    RoarError naming the difference, never silently misaligned maps. ``streaming=None`` picks the
    in-memory path when the split holds its images, else the streaming one; ``num_workers`` is the
    streaming path's number of reader processes.
    """
    _check_args(fraction, mode, granularity, fill)
    store_path = Path(store_path)
    device = torch.device(device)
    rows = _validated_layout(split, store_path, method, granularity, dataset_name, split_name)
    if streaming is None:
        streaming = not split.in_memory
    if streaming:
        return StreamingAblatedSource(
            split, store_path, method, rows, fraction, mode, fill, seed, granularity, device, num_workers
        )
    removed = _removal_masks(store_path, method, len(split), fraction, mode, seed, granularity, device)
    images = _all_images(split)
    return InMemoryAblatedSource(images, split.labels, removed, fill, device)
