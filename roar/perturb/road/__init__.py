"""ROAD's noisy linear imputation (Rong, Leemann et al., ICML 2022), batched in torch on the images' device.

Every removed pixel becomes the weighted mean of its 8 neighbours, direct ones weighing 1/6 and
diagonal ones 1/12; neighbours outside the image are dropped and the remaining weights renormalised.
Removed neighbours are unknowns too, so the removed pixels of a plane form one sparse linear system,
one right-hand side per channel (a pixel mask shares its system between the channels; a per-channel
mask gives each channel its own); then N(0, noise²) noise is added to the imputed values only.

Each plane goes to the cheapest exact route, decided by its own mask alone (so an image's result never
depends on its batch, which both ROAR retraining paths, in memory and streaming, rely on):

* at most a quarter removed, in groups (8-connected) of at most ``direct.LARGEST`` pixels, which is
  every random mask up to ~10 % removed: solved directly, a pixel alone as the mean of its neighbours
  and a group as a small dense system, in work proportional to the removed pixels
  (``roar.perturb.road.direct``);
* at most a quarter removed, with a larger group (the blobs attribution maps remove at ROAR's ImageNet
  fractions): a sparse direct factorisation of the plane's system (``roar.perturb.road.sparse``);
* more than a quarter removed: preconditioned conjugate gradients over the plane's padded grid, bound
  by memory traffic over the whole plane, the cheaper form once groups span it
  (``roar.perturb.road.grid``, whose docstring gives the tolerance and its measured error, < 2.5e-6
  against a float64 direct solve; the other routes are exact to float32 rounding);
* nothing known (the whole plane removed): there is no Dirichlet value and no unique solution, so the
  plane is set to ``fallback`` (per channel, default 0.5; the ``road`` fill uses the dataset mean).

Noise is drawn only for the imputed values, as the ROAD authors do: per image, one standard normal draw
per removed value in the order (channel, row, column), the same for a pixel mask as for its per-channel
copy.
Known values are returned bit for bit (−0.0 included; whatever the input holds at removed positions is
never used). ``docs/benchmarks.md`` (section "ROAD imputation") compares the speed with the ROAD
authors' per-image scipy solve. On the CPU the solve runs on one intra-op thread (see
``roar.core.device.one_cpu_thread``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from roar.core.device import one_cpu_thread
from roar.perturb.road import direct, grid, sparse

NOISE = 0.01
"""ROAD's default noise standard deviation, in [0, 1] image units."""

RTOL = 3e-7
"""Relative residual at which an iterated plane counts as solved; see ``roar.perturb.road.grid``."""

MAX_ITER = 20_000
"""CG iterations for a chunk of planes before the solve fails."""

Generators = torch.Generator | Sequence[torch.Generator] | None


def road_impute(
    images: torch.Tensor,
    removed: torch.Tensor,
    noise: float = NOISE,
    generator: Generators = None,
    fallback: float | Sequence[float] | None = None,
    *,
    rtol: float = RTOL,
    max_iter: int = MAX_ITER,
) -> torch.Tensor:
    """ROAD's noisy linear imputation of the ``removed`` pixels of ``images``.

    ``images`` float [B, C, H, W] in [0, 1]; ``removed`` bool [B, H, W] (pixels: every channel) or
    [B, C, H, W] (each channel its own mask and system). Returns the imputed images; positions not
    removed are bit-identical to the input. ``noise`` is the standard deviation of the Gaussian noise
    added to imputed values only, drawn from ``generator``: one ``torch.Generator`` for the batch, or a
    sequence of one per image, which makes each image's result independent of its batch. ``fallback``
    fills planes removed entirely: a float or one value per channel in [0, 1].
    """
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite standard deviation >= 0, got {noise}")
    mask, values = _arguments(images, removed, fallback, rtol)
    with one_cpu_thread(images.device):
        return _impute(images, mask, values, noise, generator, rtol, max_iter)


def linear_impute(
    images: torch.Tensor,
    removed: torch.Tensor,
    fallback: float | Sequence[float] | None = None,
    *,
    rtol: float = RTOL,
    max_iter: int = MAX_ITER,
) -> torch.Tensor:
    """The noise-free part of ``road_impute``: the removed pixels solved, every other value unchanged."""
    mask, values = _arguments(images, removed, fallback, rtol)
    with one_cpu_thread(images.device):
        return _impute(images, mask, values, 0.0, None, rtol, max_iter)


def _impute(
    images: torch.Tensor,
    mask: torch.Tensor,
    fallback: tuple[float, ...],
    noise: float,
    generator: Generators,
    rtol: float,
    max_iter: int,
) -> torch.Tensor:
    """The imputed images: every plane solved by its route, noise added, the known values as given."""
    b, c, h, w = images.shape
    out = images.clone(memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    # Planes: one per image for a pixel mask (its channels as right-hand sides), else one per channel.
    r = c if mask.shape[1] == 1 else 1
    s, hw = b * c // r, h * w
    flat = mask.reshape(-1)
    planes = flat.view(s, h, w)
    values = out.view(s, r, h, w)  # the input's values, until the end
    # The removed pixels in raster order (plane, row, column), the position of each one's R values in
    # ``out`` [R, K], each plane's route, and the solution [R, K].
    removed = flat.nonzero()[:, 0]
    plane = removed.div(hw, rounding_mode="floor")
    base = removed + plane * ((r - 1) * hw)
    position = torch.stack([base + k * hw for k in range(r)])
    count = torch.bincount(plane, minlength=s)
    nothing_known = count == hw
    iterate = (count > hw * direct.DIRECT_SHARE) & ~nothing_known
    solved = torch.empty(r, len(removed), dtype=torch.float32, device=images.device)
    at = (~iterate & ~nothing_known).index_select(0, plane).nonzero()[:, 0]
    factorise = torch.zeros_like(iterate)
    if len(at):
        solution, too_large = direct.solve(values, flat, removed.index_select(0, at))
        solved.index_copy_(1, at, solution)
        factorise[plane.index_select(0, at[too_large])] = True
    at = factorise.index_select(0, plane).nonzero()[:, 0]
    if len(at):
        chosen = factorise.nonzero()[:, 0]
        solved.index_copy_(1, at, sparse.solve_planes(values.index_select(0, chosen), planes.index_select(0, chosen)))
    at = iterate.index_select(0, plane).nonzero()[:, 0]
    if len(at):
        chosen = iterate.nonzero()[:, 0]
        every = len(chosen) == s
        sub = values if every else values.index_select(0, chosen)
        masks = flat.view(s, 1, h, w) if every else flat.view(s, 1, h, w).index_select(0, chosen)
        res = grid.solve_planes(sub.reshape(-1, h, w), masks.expand(-1, r, h, w).reshape(-1, h, w), rtol, max_iter)
        if every:  # the usual case at high fractions: every plane iterated, ``res`` laid out like ``out``
            solved = res.view(-1).index_select(0, position.view(-1)).view(r, -1)
        else:  # the chosen planes' rows in ``res``
            row_of = torch.zeros(s, dtype=torch.int64, device=images.device)
            row_of[chosen] = torch.arange(len(chosen), device=images.device)
            shift = (row_of - torch.arange(s, device=images.device)).index_select(0, plane.index_select(0, at))
            where = position.index_select(1, at) + shift * (r * hw)
            solved.index_copy_(1, at, res.view(-1).index_select(0, where.view(-1)).view(r, -1))
    at = nothing_known.index_select(0, plane).nonzero()[:, 0]
    if len(at):
        fill = torch.tensor(fallback, dtype=torch.float32, device=images.device).expand(c)
        channel = (plane.index_select(0, at) * r + torch.arange(r, device=images.device)[:, None]) % c
        solved.index_copy_(1, at, fill[channel])
    if noise > 0:
        # Scaled, then added: two exactly rounded operations (``add_(alpha=)`` may fuse them, and then
        # differently in a vector's body and its tail, which would make a value depend on its position).
        solved.add_(_gaussian(solved, plane.div(s // b, rounding_mode="floor"), b, generator).mul_(noise))
    out.view(-1).index_copy_(0, position.view(-1), solved.view(-1).to(out.dtype))
    return out


def _gaussian(solved: torch.Tensor, image: torch.Tensor, b: int, generator: Generators) -> torch.Tensor:
    """Standard normal draws shaped like ``solved`` [R, K], whose columns belong to the images ``image``
    (ascending): one generator for the batch, or each image's own generator for its columns, drawn in the
    order of the image's removed values (channel, row, column) whether its mask is per pixel or not."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(solved.shape, generator=generator, dtype=solved.dtype, device=solved.device)
    generators = list(generator)
    if len(generators) != b:
        raise ValueError(f"got {len(generators)} generators for {b} images")
    counts = torch.bincount(image, minlength=b).tolist()
    r = solved.shape[0]
    draws = [
        torch.randn(r, n, generator=g, dtype=solved.dtype, device=solved.device)
        for g, n in zip(generators, counts)
        if n
    ]
    return torch.cat(draws, dim=1) if draws else torch.empty_like(solved)


def _arguments(images: torch.Tensor, removed: torch.Tensor, fallback, rtol: float) -> tuple[torch.Tensor, tuple]:
    """The removal mask as uint8 0/1 [B, 1 or C, H, W] on the images' device, and the fallback values."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be float [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    if removed.dtype != torch.bool:
        raise ValueError(f"the removal mask must be bool, got {removed.dtype}")
    b, c, h, w = images.shape
    removed = removed.to(images.device)
    if removed.ndim == 3:
        removed = removed[:, None]
    if removed.ndim != 4 or removed.shape[0] != b or removed.shape[2:] != (h, w) or removed.shape[1] not in (1, c):
        raise ValueError(
            f"removed must be [B, H, W] or [B, C, H, W] matching images {tuple(images.shape)}, "
            f"got {tuple(removed.shape)}"
        )
    return removed.contiguous().view(torch.uint8), _fallback(fallback, c)


def _fallback(fallback: float | Sequence[float] | None, channels: int) -> tuple[float, ...]:
    values = (0.5,) if fallback is None else (fallback,) if isinstance(fallback, (int, float)) else tuple(fallback)
    values = tuple(float(v) for v in values)
    if len(values) not in (1, channels) or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"fallback must be one value or one per channel ({channels}) in [0, 1], got {values}")
    return values
