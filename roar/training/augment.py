"""Train-time augmentation on whole batches on the device: random crop with padding, flip (at random,
or alternating: ``flip_choices`` draws each example's flip for odd epochs once per run).

The ROAR seed's recipe (``RandomCrop(32, padding=4)`` and horizontal flips) done for a whole
batch at once with index arithmetic, instead of per image through PIL.
"""

from __future__ import annotations

import torch


def random_crop_flip(
    images: torch.Tensor,
    padding: int,
    flip: bool | torch.Tensor,
    generator: torch.Generator,
    *aligned: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Crop every image of ``images`` [B, C, H, W] at a random offset after zero padding, and flip
    half of them left-right (``flip=True``), or exactly those where ``flip`` (bool [B]) is set.
    Tensors in ``aligned`` ([B, ..., H, W], e.g. masks) get exactly the same crop and flip, so an
    image and its mask stay registered. Random draws come from ``generator`` on the CPU, so results
    do not depend on the device.
    """
    b, _, h, w = images.shape
    tensors = (images, *aligned)
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(images.device)
        rows = (offsets[0, :, None] + torch.arange(h, device=images.device))[:, :, None]  # [B, H, 1]
        cols = (offsets[1, :, None] + torch.arange(w, device=images.device))[:, None, :]  # [B, 1, W]
        batch = torch.arange(b, device=images.device)[:, None, None]
        cropped = []
        for t in tensors:
            lead = t.shape[1:-2]
            flat = t.reshape(b, -1, h, w)
            padded = torch.nn.functional.pad(flat, (padding, padding, padding, padding))
            out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # [B, H, W, K]
            cropped.append(out.permute(0, 3, 1, 2).reshape(b, *lead, h, w))
        tensors = tuple(cropped)
    if isinstance(flip, torch.Tensor) or flip:
        mirror = flip if isinstance(flip, torch.Tensor) else torch.rand(b, generator=generator) < 0.5
        mirror = mirror.to(images.device)
        tensors = tuple(torch.where(mirror.view(b, *([1] * (t.ndim - 1))), t.flip(-1), t) for t in tensors)
    return tuple(t.contiguous() for t in tensors)


def flip_choices(n: int, seed: int) -> torch.Tensor:
    """bool [n]: whether each example is flipped on odd epochs under ``augment.flip: alternating``
    (even epochs flip the others); drawn once per run from ``seed``."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed * 100_003 - 1)) < 0.5
