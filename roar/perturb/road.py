"""ROAD's noisy linear imputation (Rong, Leemann et al., ICML 2022), batched in torch on the images' device.

Every removed pixel becomes the weighted mean of its 8 neighbours, direct ones weighing 1/6 and
diagonal ones 1/12; neighbours outside the image are dropped and the remaining weights renormalised.
Removed neighbours are unknowns too, so the removed pixels of an image form one sparse linear system,
one right-hand side per channel; then N(0, noise²) noise is added to the imputed values only.

The solver. Multiplying row i by its normaliser (×12, so the weights become the integers 2 and 1)
gives the symmetric positive definite system ``D_i x_i − Σ_{j removed} a_ij x_j = Σ_{k known} a_ik v_k``:
a weighted graph Laplacian over the removed pixels with Dirichlet values from the known ones (D_i is
the sum of the in-image weights: 12 inside, 8 on an edge, 5 in a corner). Every channel of every
image is a *plane* with its own system, solved by Jacobi-preconditioned conjugate gradients (CG) on
the padded pixel grid, all planes of a chunk at once. The matrix-vector product is the separable
stencil [1 2 1]ᵀ[1 2 1] (which holds the 2/1 weights plus 4× the centre) written as shifted slices of
one flat buffer. CG runs in float32 (half the memory traffic of float64, which is what bounds it on a
CPU); its answer is checked and corrected in float64 (iterative refinement: the float64 residual
is the right-hand side of another float32 CG round), so the result matches a float64 direct solve
although float32 alone stalls on large holes. A plane stops once its float64 relative residual
``‖r‖_{D⁻¹} ≤ rtol · max(‖b‖_{D⁻¹}, ‖r₀‖_{D⁻¹})`` holds (b: the known-neighbour sums, r₀: the residual
of the start, which is each pixel's known-neighbour mean, or the plane's known mean where it has
no known neighbour).

Batch invariance. An image's result does not depend on which other images share its batch or at
which position: the solver uses only element-wise operations (each exactly rounded, so a value never
depends on how a kernel vectorises or splits the tensor), per-plane sums by a fixed pairwise tree,
and per-plane step sizes and stopping, a converged plane being frozen exactly. That is what lets
the ROAR retraining paths (in memory, streaming) produce bit-identical ROAD-filled images.

Singular case. A group of removed pixels that touches no known pixel (8-connected) exists only when
the whole plane is removed; it has no Dirichlet value and no unique solution, so such a plane is set
to ``fallback`` (per channel, default 0.5; the ``road`` fill uses the dataset mean) before noise.

Cost. Each CG iteration is ~19 passes over the padded grid of every plane, so the work grows with the
image size and with the number of iterations, which grows with the size of the holes (Jacobi-CG:
~9 iterations for random 10 % masks, ~50 for random 90 % masks, ~300 for one 168×168 hole in a
224×224 image); a coarse-to-fine start was measured to save only 10–20 % of them and is not used.
``docs/benchmarks.md`` (section "ROAD imputation") compares the speed with a per-image scipy solve.
On the CPU the solve runs on one intra-op thread (see ``_one_cpu_thread``).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch

from roar.errors import RoarError

NOISE = 0.01
"""ROAD's default noise standard deviation, in [0, 1] image units."""

RTOL = 3e-7
"""Relative residual at which a plane counts as solved: a direct solve agrees to ~1e-5 or better."""

MAX_ITER = 20_000
"""Float32 CG iterations for a chunk of planes (summed over refinement rounds) before the solve fails."""

CHUNK_VALUES = 1 << 18
"""Grid values per chunk of planes: large enough to amortise the overhead of each operation, small enough
to stay in cache (the solver is bound by memory traffic); the fastest of 2^15–2^19 on a 2-core EPYC."""

_ROUND_REDUCTION = 1e-6
"""A float32 round stops once it reduced its own residual by this factor or reached half the target:
float32 CG reliably gets that far; the float64 residual then says whether another round is needed."""

# The ×12 weights: direct neighbours 2, diagonal ones 1. The stencil below computes
# [1 2 1]ᵀ[1 2 1] ∗ x = Σ_neighbours a_ij x_j + 4 x_i.
_CENTRE = 4.0

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
    added to imputed values only; it is drawn for the whole image (so a pixel gets the same draw
    whatever else is removed) from ``generator``: one ``torch.Generator`` for the batch, or a sequence
    of one per image, which makes each image's result independent of its batch. ``fallback`` fills
    planes removed entirely (see the module docstring): a float or one value per channel in [0, 1].
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be float [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite standard deviation >= 0, got {noise}")
    with _one_cpu_thread(images.device):
        out = linear_impute(images, removed, fallback, rtol=rtol, max_iter=max_iter)
        if noise > 0:
            noisy = _gaussian(images, generator).mul_(noise).add_(out)
            torch.where(_plane_masks(images, removed), noisy, out, out=out)
    return out


def linear_impute(
    images: torch.Tensor,
    removed: torch.Tensor,
    fallback: float | Sequence[float] | None = None,
    *,
    rtol: float = RTOL,
    max_iter: int = MAX_ITER,
) -> torch.Tensor:
    """The noise-free part of ``road_impute``: the removed pixels solved, every other value unchanged."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be float [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    b, c, h, w = images.shape
    mask = _plane_masks(images, removed)
    values = _fallback(fallback, c)
    with _one_cpu_thread(images.device):
        planes_v = images.reshape(b * c, h, w)
        planes_m = mask.reshape(b * c, h, w)
        solved = torch.empty((b * c, h, w), dtype=images.dtype, device=images.device)
        nothing_known = torch.zeros(b * c, dtype=torch.bool, device=images.device)
        if b * c:
            g_max = max(1, CHUNK_VALUES // ((h + 2) * (w + 2)))
            ws = _workspace(h, w, min(g_max, b * c), images.device)
            for start in range(0, b * c, g_max):
                stop = min(start + g_max, b * c)
                ws.solve(planes_v[start:stop], planes_m[start:stop], solved[start:stop], rtol, max_iter)
                nothing_known[start:stop] = ws.nothing_known[: stop - start]
        solved = solved.view(b, c, h, w)
        # Planes with no known pixel: the fallback (their solve above was trivially empty).
        if bool(nothing_known.any()):
            fill = torch.tensor(values, dtype=images.dtype, device=images.device).expand(c).view(1, c, 1, 1)
            torch.where(nothing_known.view(b, c, 1, 1), fill, solved, out=solved)
        return torch.where(mask, solved, images, out=solved)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run CPU work with one intra-op thread, restoring the setting afterwards (process-wide, like
    ``torch.set_num_threads`` itself).

    The solver is a long sequence of small memory-bound operations. Split over threads they gain
    little, and when another process occupies a core every operation waits at a barrier for the
    descheduled thread: measured on 2 shared cores, 2 threads ran 50–100× slower than 1.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_cache = threading.local()


def _workspace(h: int, w: int, g: int, device: torch.device) -> _Workspace:
    """The calling thread's workspace for this image size and device, with room for at least g planes."""
    ws = getattr(_cache, "workspace", None)
    if ws is None or (ws.h, ws.w, ws.device) != (h, w, device) or ws.g < g:
        _cache.workspace = None  # free the old buffers before allocating new ones
        ws = _cache.workspace = _Workspace(h, w, g, device)
    return ws


# --------------------------------------------------------------------------------------------- arguments


def _plane_masks(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``removed`` as bool [B, C, H, W] on the images' device (a pixel mask expanded over channels)."""
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
    return removed.expand(b, c, h, w)


def _fallback(fallback: float | Sequence[float] | None, channels: int) -> tuple[float, ...]:
    values = (0.5,) if fallback is None else (fallback,) if isinstance(fallback, (int, float)) else tuple(fallback)
    values = tuple(float(v) for v in values)
    if len(values) not in (1, channels) or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"fallback must be one value or one per channel ({channels}) in [0, 1], got {values}")
    return values


def _gaussian(images: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal draws of the images' shape: one generator for the batch, or one per image."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device)
    generators = list(generator)
    if len(generators) != len(images):
        raise ValueError(f"got {len(generators)} generators for {len(images)} images")
    shape = images.shape[1:]
    return (
        torch.stack([torch.randn(shape, generator=g, dtype=images.dtype, device=images.device) for g in generators])
        if generators
        else torch.empty_like(images)
    )


# --------------------------------------------------------------------------------------------- solver


def _halving_plan(a: torch.Tensor, scratch: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The additions (out, x, y) that sum each row of ``a`` [g, n] into ``scratch[:, :1]``.

    A pairwise tree that depends only on n: every step adds the second half of the row onto the
    first (an odd last element is added to element 0 afterwards). No reduction kernel is involved,
    so each row's sum is the same whatever the other rows and however the kernels split the work.
    The views are built once and reused: on small chunks, building them costs as much as adding.
    """
    n = a.shape[1]
    if n == 1:
        return [(scratch[:, :1], a[:, :1], torch.zeros_like(a[:, :1]))]
    half = n // 2
    steps = [(scratch[:, :half], a[:, :half], a[:, half : 2 * half])]
    if n % 2:
        steps.append((scratch[:, :1], scratch[:, :1], a[:, n - 1 : n]))
    length = half
    while length > 1:
        half = length // 2
        steps.append((scratch[:, :half], scratch[:, :half], scratch[:, half : 2 * half]))
        if length % 2:
            steps.append((scratch[:, :1], scratch[:, :1], scratch[:, length - 1 : length]))
        length = half
    return steps


def _run_plan(steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Execute a ``_halving_plan``; the row sums [g, 1] (a fresh tensor)."""
    for out, x, y in steps:
        torch.add(x, y, out=out)
    return steps[-1][0][:, :1].clone()


def _halving_sum(a: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Row sums [g, 1] of ``a`` [g, n] by the fixed pairwise tree of ``_halving_plan``."""
    return _run_plan(_halving_plan(a, scratch))


class _Grid:
    """Flat buffers for g planes padded to (H+2)×(W+2), with margins so that every shifted slice
    of the stencil stays inside the buffer; margins and padding stay zero."""

    def __init__(self, h: int, w: int, g: int, dtype: torch.dtype, device: torch.device):
        self.h, self.w, self.g = h, w, g
        self.w2 = w + 2
        self.p = (h + 2) * (w + 2)
        self.margin = self.w2 + 1
        n = g * self.p
        self._x = torch.zeros(n + 2 * self.margin, dtype=dtype, device=device)  # stencil input, with margins
        self._v = torch.zeros(n + 2, dtype=dtype, device=device)  # vertical pass, one-element margins
        self._out = torch.zeros(n, dtype=dtype, device=device)
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}

    def x(self, g: int) -> torch.Tensor:
        """The stencil input of the first g planes, [g, P] (a view into the margined buffer)."""
        return self._x[self.margin : self.margin + g * self.p].view(g, self.p)

    def interior(self, field: torch.Tensor) -> torch.Tensor:
        """The unpadded [g, H, W] view of a [g, P] field."""
        return field.view(-1, self.h + 2, self.w + 2)[:, 1:-1, 1:-1]

    def sep(self, g: int) -> torch.Tensor:
        """[1 2 1]ᵀ[1 2 1] ∗ x over the first g planes, [g, P]; valid at interior positions, finite elsewhere.

        Each pass is (a + c) + b + b: a fixed order of exactly rounded additions.
        """
        views = self._views.get(g)
        if views is None:
            n, m, w2 = g * self.p, self.margin, self.w2
            views = self._views[g] = (
                self._x[m - w2 : m - w2 + n],
                self._x[m + w2 : m + w2 + n],
                self._x[m : m + n],
                self._v[0:n],
                self._v[2 : 2 + n],
                self._v[1 : 1 + n],
                self._out[:n],
            )
        above, below, x, left, right, v, out = views
        torch.add(above, below, out=v)
        v.add_(x, alpha=2)
        torch.add(left, right, out=out)
        out.add_(v, alpha=2)
        return out.view(g, self.p)


class _Workspace:
    """Buffers for chunks of up to g planes of one image size, reused from chunk to chunk (and from call
    to call: fresh memory costs a page fault per 4 KiB, which on a CPU is a sizeable part of a solve).

    Float32 fields: ``m`` 1 at removed positions, ``dinv`` 1/D there (0 elsewhere); the CG vectors.
    """

    def __init__(self, h: int, w: int, g: int, device: torch.device):
        self.h, self.w, self.g, self.device = h, w, g, device
        self.g32 = _Grid(h, w, g, torch.float32, device)
        p = self.p = self.g32.p
        self.m, self.dinv, self.r, self.z, self.q, self.e, self.tmp = (
            torch.zeros(g, p, dtype=torch.float32, device=device) for _ in range(7)
        )
        self.flag = torch.zeros(g, p, dtype=torch.bool, device=device)
        self.stage = torch.zeros(g, h, w, dtype=torch.float32, device=device)
        self.scratch = torch.zeros(g, p // 2 + 1, dtype=torch.float32, device=device)
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        self._plans: dict[int, list] = {}
        # D (the sum of in-image ×12 weights: 12, 8 on an edge, 5 in a corner) and D + 4, per position.
        inside = torch.zeros(h + 2, w + 2, dtype=torch.float32, device=device)
        inside[1:-1, 1:-1] = 1
        self.inside = inside.view(1, p)
        one = _Grid(h, w, 1, torch.float32, device)
        one.x(1).copy_(self.inside)
        d = one.sep(1).sub_(self.inside * _CENTRE).clamp_(min=1)  # 1 on the padding
        self.d = d.clone()
        self.dplus32 = d + _CENTRE

    def _sum_tmp(self, g: int) -> torch.Tensor:
        """Per-plane sums [g, 1] of ``tmp[:g]``."""
        plan = self._plans.get(g)
        if plan is None:
            plan = self._plans[g] = _halving_plan(self.tmp[:g], self.scratch[:g])
        return _run_plan(plan)

    def _weighted_norm(self, r: torch.Tensor, g: int) -> torch.Tensor:
        """Σ r²/D per plane, [g, 1] (r float32 [g, P], zero off the removed positions)."""
        tmp = self.tmp[:g]
        torch.mul(r, r, out=tmp)
        tmp.mul_(self.dinv[:g])
        return self._sum_tmp(g)

    def solve(self, values: torch.Tensor, removed: torch.Tensor, out: torch.Tensor, rtol: float, max_iter: int):
        """Solve g planes: ``values`` [g, H, W], ``removed`` bool [g, H, W]; the result (the known values at
        known positions, the solution at removed ones) into ``out`` [g, H, W]."""
        g, grid = len(values), self.g32
        m, dinv, r, z, q, x, tmp = (t[:g] for t in (self.m, self.dinv, self.r, self.z, self.q, self.e, self.tmp))
        d = grid.x(g)  # the stencil's input: first the known values, then the search direction
        grid.interior(m).copy_(removed)
        torch.div(m, self.d, out=dinv)
        # Known-neighbour weight of every removed pixel, and the known count of every plane.
        torch.sub(self.inside, m, out=d)
        count = _halving_sum(d, self.scratch[:g])
        self.nothing_known = count[:, 0] == 0
        dk = z
        torch.mul(grid.sep(g), m, out=dk)
        # Known values (0 at removed positions); b = the ×12 known-neighbour sums at removed positions.
        stage = self.stage[:g]
        torch.where(removed, self.zero, values.to(torch.float32), out=stage)
        grid.interior(d).copy_(stage)
        mean = _halving_sum(d, self.scratch[:g]).div_(count.clamp_(min=1))
        b = q
        torch.mul(grid.sep(g), m, out=b)
        bb = self._weighted_norm(b, g)
        # Start: the known-neighbour mean, or the plane's known mean where a pixel has no known neighbour.
        has_known = torch.gt(dk, 0, out=self.flag[:g])
        torch.div(b, dk.clamp_(min=1), out=b)
        torch.where(has_known, b, mean, out=b)
        b.mul_(m)
        d.add_(b)  # known values + start: the whole image
        x.copy_(d)
        # r = b − A x = sep(x) − (D + 4)·x at removed positions.
        torch.mul(d, self.dplus32, out=r)
        torch.sub(grid.sep(g), r, out=r)
        r.mul_(m)
        # Jacobi-preconditioned CG from there; a plane stops (is frozen) once its residual is small enough.
        torch.mul(r, dinv, out=z)
        d.copy_(z)
        torch.mul(r, z, out=tmp)
        rz = self._sum_tmp(g)
        target = torch.maximum(bb, rz).mul_(rtol * rtol)
        active = rz > target
        zero = self.zero
        it = 0
        while bool(active.any()):
            if it >= max_iter:
                raise RoarError(
                    f"ROAD imputation did not reach relative residual {rtol:.0e} in {max_iter} CG iterations; "
                    "raise max_iter or rtol"
                )
            # q = A d = (D + 4)·d − sep(d); d is zero off the removed positions.
            s = grid.sep(g)
            torch.mul(d, self.dplus32, out=q)
            q.sub_(s)
            torch.mul(d, q, out=tmp)
            alpha = torch.where(active, rz / self._sum_tmp(g), zero)
            torch.mul(d, alpha, out=tmp)
            x.add_(tmp)
            torch.mul(q, alpha, out=tmp)
            r.sub_(tmp)
            torch.mul(r, dinv, out=z)
            torch.mul(r, z, out=tmp)
            rz_new = self._sum_tmp(g)
            active = active & (rz_new > target)
            beta = torch.where(active, rz_new / rz, zero)
            d.mul_(beta)
            d.add_(z)
            rz = rz_new
            it += 1
        self.iterations = it
        out.copy_(grid.interior(x))
