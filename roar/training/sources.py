"""Where training and evaluation batches come from.

Two paths with one interface, ``source.batches(batch_size, generator)`` yielding
``(images float [B, C, H, W] in [0, 1] on the device, labels, indices)``:

* ``InMemorySource``: the whole split as uint8 tensors on the device (GPU when present); a batch
  is an index into them. This is what makes small-model training fast: no per-sample Python,
  no host-to-device copy per step.
* ``StreamSource``: a DataLoader whose workers decode images from disk, for datasets that do
  not fit in memory (ImageNet).

ROAR/KAR retraining reads ablated batches from its own sources with the same interface
(``roar.stages.retrain.data``).

Both take an optional ``shard``, a function from the epoch's order to this process's part of it
(``roar.training.distributed.shard`` or ``split``): in data-parallel training every rank draws the
same seeded permutation and keeps only its own part, so the ranks need not exchange indices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from roar.core.device import pin_memory
from roar.data.base import ImageSplit

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Shard = Callable[[torch.Tensor], torch.Tensor]


def _permutation(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)


def _batch_slices(order: torch.Tensor, batch_size: int, drop_last: bool) -> Iterator[torch.Tensor]:
    n = len(order)
    # A training batch of one would break BatchNorm; dropping a short tail is the usual cure.
    stop = n - n % batch_size if drop_last and n > batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


class InMemorySource:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        shard: Shard | None = None,
    ) -> Iterator[Batch]:
        order = _permutation(len(self), generator)
        if shard is not None:
            order = shard(order)
        for idx in _batch_slices(order, batch_size, drop_last):
            idx_dev = idx.to(self.device)
            images = self.images[idx_dev].float().div_(255)
            yield images, self.labels[idx_dev], idx


class _Indexed(torch.utils.data.Dataset):
    """Adds the index to each item so batches can be paired with per-example data (maps)."""

    def __init__(self, split: ImageSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image, label = self.split[i]
        return image, label, i


class StreamSource:
    def __init__(self, split: ImageSplit, device: torch.device, num_workers: int = 4):
        self.split = split
        self.device = device
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.split)

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        shard: Shard | None = None,
    ) -> Iterator[Batch]:
        data = _Indexed(self.split)
        if shard is not None:  # this rank's part of the order, in its order
            sampler = shard(_permutation(len(data), generator)).tolist()
        elif generator is not None:
            sampler = RandomSampler(data, generator=generator)
        else:
            sampler = SequentialSampler(data)
        loader = DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last and len(sampler) > batch_size,
            num_workers=self.num_workers,
            pin_memory=pin_memory(self.device),
            persistent_workers=False,
        )
        for images, labels, idx in loader:
            images = images.to(self.device, non_blocking=True).float().div_(255)
            yield images, labels.to(self.device, non_blocking=True), idx


def source_for(split: ImageSplit, device: torch.device, num_workers: int = 4):
    """The in-memory path when the split holds its images, else the streaming one."""
    if split.in_memory:
        return InMemorySource(split.images, split.labels, device)
    return StreamSource(split, device, num_workers)
