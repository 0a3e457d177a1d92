"""The iterative solve of ROAD's system on the padded pixel grid, for planes removing more than a quarter of
their pixels (``roar.perturb.road`` sends the others to ``direct`` or ``sparse``).

Multiplying row i by its normaliser (×12, so the weights become the integers 2 and 1) gives the
symmetric positive definite system ``D_i x_i − Σ_{j removed} a_ij x_j = Σ_{k known} a_ik v_k``,
``A x = b``: a weighted graph Laplacian over the removed pixels with Dirichlet values from the known
ones (D_i is the sum of the in-image weights: 12 inside, 8 on an edge, 5 in a corner; N = D − A holds
the removed-neighbour weights). Every plane has its own system, solved by preconditioned conjugate
gradients (CG) in float32 on a padded pixel grid, all planes of a chunk at once. The matrix-vector
product is the separable stencil [1 2 1]ᵀ[1 2 1] (the 2/1 weights plus 4× the centre), 4 passes over
shifted slices of one flat buffer. The preconditioner is Jacobi plus the next term of its Neumann
series, ``M⁻¹ = D⁻¹ + D⁻¹ N D⁻¹`` (one more stencil): symmetric positive definite because D + N is
diagonally dominant, it turns the spectrum 1 − s of Jacobi (s ∈ [−1, 1) an eigenvalue of D⁻¹N) into
1 − s², which cut the iterations 1.7× for ~1.4× the work per iteration. The start is each pixel's
known-neighbour mean (exact for an isolated pixel), or the plane's known mean where a pixel has no
known neighbour.

The tolerance. A plane stops once ``‖r‖_{M⁻¹} ≤ rtol · max(‖b‖_{D⁻¹}, ‖r₀‖_{M⁻¹})`` (r₀: the residual of
the start), with rtol = 3e-7 up to 1024 pixels and rtol·(1024/pixels)^¾ above (at a fixed relative
residual the largest error grows with the plane). A relative residual bounds the error only loosely,
so rtol was set by measurement against a float64 direct solve: at most 2.5e-6 (max abs) over 4800
random 32×32 planes (10–99 % removed) and 480 random 96×96 ones, and at most 2.0e-6 on the hardest
masks tried at 32×32 and 224×224 (random 90 % and 99 %, all but the border, all but one row, a centred
hole of 3/4 the side); rtol = 1e-6 had reached 1.2e-5. tests/test_road.py keeps such masks < 1e-5.
Float32 alone gets there (no float64 correction) because CG starts close to the solution and float32
rounding (~6e-8 relative) stays well below the tolerance; its limit shows only as ~1e-6 errors on the
largest holes.

Batch invariance. A plane's result does not depend on which other planes share its chunk or at which
row: the solver uses only element-wise operations (each exactly rounded, so a value never depends on
how a kernel vectorises or splits the tensor; no fused multiply-add unless the product is exact),
per-plane float sums by a fixed pairwise tree, integer or comparison reductions (exact in any order),
and per-plane step sizes and stopping, a converged plane being frozen exactly. A chunk drops its
finished planes once at most half of them are still iterating (the others move up a row, which
changes nothing in their arithmetic). Known values are masked by integer operations on the floats'
bits (whatever the input holds at removed positions is never used), not ``torch.where``, which on
this CPU is about 25× slower than a multiplication.

Cost. Setup is ~55 passes over the padded grid of a plane ((H+1)(W+1) values), each CG iteration ~22
passes plus two per-plane sums; the solver is bound by memory traffic. Iterations at 32×32: ~9 for
random 50 % masks, ~23 at 90 %; at 224×224 ~12, ~32, and ~190 for one 168×168 hole.
"""

from __future__ import annotations

import threading

import torch

from roar.core.errors import RoarError

CHUNK_VALUES = 1 << 18
"""Grid values per chunk of planes: large enough to amortise the overhead of each operation, small enough
to stay in cache (the solver is bound by memory traffic); the fastest of 2^16–2^20 on a 2-core EPYC."""

COMPACT = 0.5
"""Once at most this share of a chunk's planes is still iterating, the finished ones are dropped."""

# The ×12 weights: direct neighbours 2, diagonal ones 1. The stencil below computes
# [1 2 1]ᵀ[1 2 1] ∗ x = Σ_neighbours a_ij x_j + 4 x_i.
_CENTRE = 4.0

_RTOL_PIXELS = 1024
"""Planes of more pixels than this get a tighter tolerance, rtol · (this / pixels)^¾ (see the module docstring)."""

_MEAN_WEIGHT = 2.0**-30


def solve_planes(values: torch.Tensor, removed: torch.Tensor, rtol: float, max_iter: int) -> torch.Tensor:
    """Solve the planes ``values`` [g, H, W] with removal masks ``removed`` uint8 0/1 [g, H, W] (each with
    a known pixel), chunk by chunk; float32 [g, H, W], every removed position solved."""
    g, h, w = values.shape
    res = torch.empty(g, h, w, dtype=torch.float32, device=values.device)
    if g == 0:
        return res
    per_chunk = -(-g // max(1, round(g * (h + 1) * (w + 1) / CHUNK_VALUES)))
    ws = _workspace(h, w, min(per_chunk, g), values.device)
    for i in range(0, g, per_chunk):
        j = min(i + per_chunk, g)
        ws.solve(values[i:j], removed[i:j], res[i:j], rtol, max_iter)
    return res


_cache = threading.local()


def _workspace(h: int, w: int, g: int, device: torch.device) -> _Workspace:
    """The calling thread's workspace for this image size and device, with room for at least g planes."""
    ws = getattr(_cache, "workspace", None)
    if ws is None or (ws.h, ws.w, ws.device) != (h, w, device) or ws.g < g:
        _cache.workspace = None  # free the old buffers before allocating new ones
        ws = _cache.workspace = _Workspace(h, w, g, device)
    return ws


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
    """Flat buffers for g planes on a padded grid: each plane is H+1 rows of W+1 values, a zero row
    first and a zero column last in every row, so that each pixel's 8 neighbours are at fixed offsets
    and the outside of the image reads as zeros (the next plane's zero row closes the plane below).
    Margins before and after keep every shifted slice of the stencil inside the buffer; margins and
    padding stay zero in the stencil's input."""

    def __init__(self, h: int, w: int, g: int, device: torch.device):
        self.h, self.w, self.g = h, w, g
        self.w1 = w + 1
        self.p = (h + 1) * (w + 1)
        self.margin = 2 * self.w1
        n = g * self.p
        self._x = torch.zeros(n + 2 * self.margin, dtype=torch.float32, device=device)  # stencil input
        self._v = torch.zeros(n + 2, dtype=torch.float32, device=device)  # vertical pass, one-element margins
        self._out = torch.zeros(n, dtype=torch.float32, device=device)
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}

    def x(self, g: int) -> torch.Tensor:
        """The stencil input of the first g planes, [g, P] (a view into the margined buffer)."""
        return self._x[self.margin : self.margin + g * self.p].view(g, self.p)

    def interior(self, field: torch.Tensor) -> torch.Tensor:
        """The image positions, [g, H, W], of a [g, P] field."""
        return field.view(-1, self.h + 1, self.w1)[:, 1:, : self.w]

    def sep(self, g: int) -> torch.Tensor:
        """[1 2 1]ᵀ[1 2 1] ∗ x over the first g planes, [g, P]; valid at image positions, finite elsewhere.

        Each pass is (a + c) + 2b: a fixed order of exactly rounded operations (×2 is exact)."""
        views = self._views.get(g)
        if views is None:
            n, m, w1 = g * self.p, self.margin, self.w1
            views = self._views[g] = (
                self._x[m - w1 : m - w1 + n],
                self._x[m + w1 : m + w1 + n],
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

    Float32 [g, P] fields: ``m`` 1 at removed positions, ``dinv`` 1/D there (0 elsewhere), the CG
    vectors; ``keep`` [g, H, W] int32, all bits set at known positions."""

    def __init__(self, h: int, w: int, g: int, device: torch.device):
        self.h, self.w, self.g, self.device = h, w, g, device
        self.grid = _Grid(h, w, g, device)  # holds the search direction
        self.pre = _Grid(h, w, g, device)  # holds D⁻¹ r, for the preconditioner
        p = self.p = self.grid.p
        self.m, self.dinv, self.r, self.z, self.q, self.x, self.tmp = (
            torch.zeros(g, p, dtype=torch.float32, device=device) for _ in range(7)
        )
        self.keep = torch.zeros(g, h, w, dtype=torch.int32, device=device)
        self.scratch = torch.zeros(g, p // 2 + 1, dtype=torch.float32, device=device)
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        self._plans: dict[int, list] = {}
        # D (the sum of in-image ×12 weights: 12, 8 on an edge, 5 in a corner) and D + 4, per position.
        one = _Grid(h, w, 1, device)
        inside = one.x(1)
        one.interior(inside).fill_(1)
        self.inside = inside.clone()
        d = one.sep(1).sub_(self.inside * _CENTRE).clamp_(min=1)  # 1 off the image
        self.d = d.clone()
        self.dplus = d + _CENTRE

    def _sum_tmp(self, g: int) -> torch.Tensor:
        """Per-plane sums [g, 1] of ``tmp[:g]``."""
        plan = self._plans.get(g)
        if plan is None:
            plan = self._plans[g] = _halving_plan(self.tmp[:g], self.scratch[:g])
        return _run_plan(plan)

    def _precondition(self, g: int, r: torch.Tensor, dinv: torch.Tensor, z: torch.Tensor) -> None:
        """z = (D⁻¹ + D⁻¹ N D⁻¹) r: Jacobi plus the next term of its Neumann series (N: the neighbour
        weights, sep − 4·centre). Symmetric and positive definite, as D + N is diagonally dominant."""
        u = self.pre.x(g)
        torch.mul(r, dinv, out=u)
        t = self.pre.sep(g)
        t.sub_(u, alpha=4)
        t.mul_(dinv)
        torch.add(u, t, out=z)

    def solve(self, values: torch.Tensor, removed: torch.Tensor, res: torch.Tensor, rtol: float, max_iter: int) -> None:
        """Solve g planes: ``values`` [g, H, W] (any float type; removed positions are never read),
        ``removed`` uint8 0/1 [g, H, W] with at least one known pixel per plane; the solution at every
        position into ``res`` float32 [g, H, W] (removed ones solved, known ones as given)."""
        g, grid = len(values), self.grid
        m, dinv, r, z, q, x, tmp = (t[:g] for t in (self.m, self.dinv, self.r, self.z, self.q, self.x, self.tmp))
        d = grid.x(g)  # the stencil's input: first the known values, then the search direction
        grid.interior(m).copy_(removed)
        torch.div(m, self.d, out=dinv)
        # Known-neighbour weight of every removed pixel, and the known count of every plane (an integer
        # sum: exact in any order).
        torch.sub(self.inside, m, out=d)
        count = self.h * self.w - removed.sum(dim=(1, 2), dtype=torch.int32).view(g, 1)
        dk = z
        torch.mul(grid.sep(g), m, out=dk)
        # Known values (+0 at removed positions, whatever was there); b = the ×12 known-neighbour sums.
        keep = self.keep[:g]
        keep.copy_(removed)
        keep.sub_(1)  # all bits set at known positions
        values32 = values.to(torch.float32)
        torch.bitwise_and(values32.view(torch.int32), keep, out=grid.interior(d).view(torch.int32))
        mean = _halving_sum(d, self.scratch[:g]).div_(count.clamp(min=1))
        b = q
        torch.mul(grid.sep(g), m, out=b)
        torch.mul(b, b, out=tmp)
        tmp.mul_(dinv)
        bb = self._sum_tmp(g)
        # Start: the known-neighbour mean, or the plane's known mean where a pixel has no known neighbour
        # (the mean weighs 2⁻³⁰: it decides only where the known-neighbour weight is 0).
        b.add_(mean.mul_(_MEAN_WEIGHT))
        dk.add_(_MEAN_WEIGHT)
        torch.div(b, dk, out=b)
        b.mul_(m)
        d.add_(b)  # known values + start: the whole image
        x.copy_(d)
        # r = b − A x = sep(x) − (D + 4)·x at removed positions.
        torch.mul(d, self.dplus, out=r)
        torch.sub(grid.sep(g), r, out=r)
        r.mul_(m)
        # Preconditioned CG from there; a plane stops (is frozen) once its residual is small enough.
        self._precondition(g, r, dinv, z)
        d.copy_(z)
        torch.mul(r, z, out=tmp)
        rz = self._sum_tmp(g)
        target = torch.maximum(bb, rz).mul_(rtol * rtol * min(1.0, _RTOL_PIXELS / (self.h * self.w)) ** 1.5)
        active = rz > target
        zero = self.zero
        rows = None  # the plane of each row, once finished planes have been dropped
        it = 0
        while (left := int(active.sum())) > 0:
            if it >= max_iter:
                raise RoarError(
                    f"ROAD imputation did not reach relative residual {rtol:.0e} in {max_iter} CG iterations; "
                    "raise max_iter or rtol"
                )
            if left <= len(active) * COMPACT:
                # The finished planes leave (their result goes to ``res``), the others move up: rows are
                # independent, so a plane's arithmetic does not depend on its row.
                done, kept = (~active[:, 0]).nonzero()[:, 0], active[:, 0].nonzero()[:, 0]
                rows = torch.arange(len(active), device=self.device) if rows is None else rows
                res.index_copy_(0, rows[done], grid.interior(x[done]))
                for t in (x, r, dinv, d):
                    t[:left] = t[kept]
                rows, rz, target, active = rows[kept], rz[kept], target[kept], active[kept]
                dinv, r, z, q, x, tmp = (t[:left] for t in (self.dinv, self.r, self.z, self.q, self.x, self.tmp))
                d = grid.x(left)
            k = len(active)
            # q = A d = (D + 4)·d − sep(d); d is zero off the removed positions.
            s = grid.sep(k)
            torch.mul(d, self.dplus, out=q)
            q.sub_(s)
            torch.mul(d, q, out=tmp)
            alpha = torch.where(active, rz / self._sum_tmp(k), zero)
            torch.mul(d, alpha, out=tmp)
            x.add_(tmp)
            torch.mul(q, alpha, out=tmp)
            r.sub_(tmp)
            self._precondition(k, r, dinv, z)
            torch.mul(r, z, out=tmp)
            rz_new = self._sum_tmp(k)
            active = active & (rz_new > target)
            beta = torch.where(active, rz_new / rz, zero)
            d.mul_(beta)
            d.add_(z)
            rz = rz_new
            it += 1
        if rows is None:
            res.copy_(grid.interior(x))
        else:
            res.index_copy_(0, rows, grid.interior(x))
