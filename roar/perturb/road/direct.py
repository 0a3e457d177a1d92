"""Direct solves of ROAD's system where the removed pixels form small groups.

Two removed pixels share an equation only if they are neighbours, so the system of a plane falls apart
into one independent system per 8-connected group (component) of removed pixels. A pixel alone is its
own solution, the weighted mean of its known neighbours; a group of 2–``LARGEST`` pixels is a small
dense system, solved exactly. That is all there is to do for random masks removing up to ~10 % of the
pixels (at 10 % the largest group of a 224×224 plane has ~11 pixels; above ~20 % groups grow quickly
and merge into one spanning the plane at ~40 %, the site-percolation threshold of the 8-neighbour
lattice), so a plane whose groups are all small is solved without iterating and in work proportional
to its removed pixels. Planes with a larger group go to the sparse factorisation of
``roar.perturb.road.sparse``.

The equations use the ×12 integer weights (direct neighbours 2, diagonal ones 1): row i reads
``D_i x_i − Σ_{j removed} a_ij x_j = Σ_{k known} a_ik v_k`` with D_i the sum of the in-image weights.
The matrix is exact in float64, the right-hand side is summed in float32 (relative error < 3e-7), the
dense systems are solved in float64 by Gauss–Jordan elimination without pivoting (stable: the matrix is
diagonally dominant and irreducibly so, as every group touches a known pixel unless its plane is
removed entirely), and the result rounds once to float32: within ~1.2e-7 of a float64 direct solve.

Batch invariance. Everything here is element-wise or indexing per pixel or per group; a group's system
is padded to a size fixed by its own (``_SYSTEM_SIZES``; identity rows, which change no value of the
others), so its arithmetic is the same whatever other groups or planes are solved beside it.
"""

from __future__ import annotations

import threading

import torch

LARGEST = 16
"""Groups of removed pixels up to this size are solved directly; a plane with a larger one is factorised."""

NEIGHBOURS = ((-1, -1, 1), (-1, 0, 2), (-1, 1, 1), (0, -1, 2), (0, 1, 2), (1, -1, 1), (1, 0, 2), (1, 1, 1))
"""(dy, dx, ×12 weight) of the 8 neighbours, in the fixed order every sum over them follows."""

DIRECT_SHARE = 0.25
"""Planes removing more than this share of their pixels go straight to the iterative solve: their groups
are far above ``LARGEST`` (the largest of a random 224×224 mask is ~40 pixels at 20 %) and soon span
the plane, where a factorisation fills in and CG over the grid is the cheaper form (``docs/benchmarks.md``:
12–17× the authors' factorisation at 50 and 90 %). A function of the plane alone, like every routing
choice."""


CHUNK_PIXELS = 1 << 16
"""Removed pixels per chunk of whole planes: bounds the memory of the per-pixel arrays (~0.4 KB a pixel,
~25 MB a chunk) while amortising the ~150 operations of a chunk; of 2^12–2^20, 2^16 and above were the
fastest on a 2-core EPYC (smaller chunks stay in cache but pay more per-operation overhead)."""


def solve(values: torch.Tensor, removed: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_solve`` over chunks of about ``CHUNK_PIXELS`` removed pixels, a plane never split."""
    s, _, h, w = values.shape
    counts = torch.bincount(at.div(h * w, rounding_mode="floor"), minlength=s)
    ends = torch.cumsum(counts[counts > 0], 0)
    bounds, start = [0], 0
    for end in ends.tolist():
        if end - start >= CHUNK_PIXELS:
            bounds.append(end)
            start = end
    if bounds[-1] != len(at):
        bounds.append(len(at))
    parts = [_solve(values, removed, at[a:b]) for a, b in zip(bounds, bounds[1:])]
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts])


def _solve(values: torch.Tensor, removed: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the removed pixels ``at`` (flat positions into ``removed``, ascending: every removed pixel of
    the planes concerned, each plane with a known pixel) of planes ``values`` [S, R, H, W] with masks
    ``removed`` uint8 0/1 [S·H·W] (R right-hand sides sharing one mask: the channels of a pixel mask).

    Returns the float32 solution [R, n] and, per pixel, whether its plane has a group larger than
    ``LARGEST`` (then its solution is not computed and the plane must be factorised instead)."""
    s, r, h, w = values.shape
    device, n = values.device, len(at)
    plane = at.div(h * w, rounding_mode="floor")
    y, x = (at - plane * (h * w)).div(w, rounding_mode="floor"), at % w
    # All 8 neighbours of every pixel, [n, 8] (a pixel's neighbours side by side: they share 3 rows of
    # the image, so reading them together stays in cache): inside the image (from which borders the
    # pixel touches), removed, known; each neighbour's position (the pixel's own where the neighbour is
    # outside). A value is read only where its neighbour is known (what a removed position holds is never
    # used). index_select: several times faster than indexing.
    edge = (y == 0).long() + (y == h - 1).long() * 2 + (x == 0).long() * 4 + (x == w - 1).long() * 8
    inside = _INSIDE.to(device).index_select(0, edge)
    other = torch.where(inside, at[:, None] + _offsets(w).to(device), at[:, None])
    gone = inside & removed.index_select(0, other.view(-1)).view(n, 8).bool()
    known = inside & ~gone
    # Channel c of a neighbour is at (plane·R + c)·H·W + its pixel: one index, read from R shifted views.
    index = (other + (plane * ((r - 1) * h * w))[:, None]).view(-1)
    flat = values.reshape(-1)
    value = torch.empty(r, n * 8, dtype=values.dtype, device=device)
    for c in range(r):
        torch.index_select(flat[c * h * w :], 0, index, out=value[c])
    value = value.view(r, n, 8).masked_fill_(~known, 0.0).to(torch.float32)
    # D, and b summed over the neighbours in a fixed order (direct ones ×2, diagonal ones ×1), in float32
    # (relative error < 3e-7; summing in float64 cost a third of the solve).
    diagonal = _DIAGONAL.to(device).index_select(0, edge)
    v = value.unbind(dim=2)
    rhs = ((v[1] + v[3] + v[4] + v[6]) * 2.0 + (v[0] + v[2] + v[5] + v[7])).double()
    solution = rhs / diagonal  # exact for a pixel alone
    too_large = torch.zeros(n, dtype=torch.bool, device=device)
    grouped = gone.any(dim=1).nonzero()[:, 0]
    if len(grouped):
        # Each grouped pixel's removed neighbours as indices among the grouped pixels (its own index
        # where the neighbour is not removed), through a lookup written only at the removed positions.
        lookup = _lookup(len(removed), device)
        lookup.index_copy_(0, at, torch.arange(n, device=device))
        index = torch.empty(n, dtype=torch.int64, device=device)
        index.index_copy_(0, grouped, torch.arange(len(grouped), device=device))
        linked = gone.index_select(0, grouped)
        positions = torch.where(linked, other.index_select(0, grouped), at.index_select(0, grouped)[:, None])
        links = index.index_select(0, lookup.index_select(0, positions.view(-1))).view(linked.shape)
        grouped_plane = plane.index_select(0, grouped)
        label, unsettled = _groups(links, grouped_plane)
        sizes = torch.bincount(label, minlength=len(grouped)).index_select(0, label)
        large_planes = torch.cat([grouped_plane[sizes > LARGEST], unsettled]).unique()
        if len(large_planes):
            too_large = torch.isin(plane, large_planes)
        small = (~too_large.index_select(0, grouped)).nonzero()[:, 0]
        if len(small) == len(grouped):  # the usual case: no plane of the chunk holds a larger group
            solved = _solve_groups(
                label,
                links,
                linked,
                small,
                diagonal.index_select(0, grouped),
                rhs.index_select(1, grouped),
                len(grouped),
            )
            solution.index_copy_(1, grouped, solved)
        elif len(small):
            members = grouped.index_select(0, small)
            solved = _solve_groups(
                label.index_select(0, small),
                links.index_select(0, small),
                linked.index_select(0, small),
                small,
                diagonal.index_select(0, members),
                rhs.index_select(1, members),
                len(grouped),
            )
            solution.index_copy_(1, members, solved)
    return solution.to(torch.float32), too_large


def _offsets(w: int) -> torch.Tensor:
    """Flat offsets [8] of the 8 neighbours in rows of width w."""
    return torch.tensor([dy * w + dx for dy, dx, _ in NEIGHBOURS])


def _border_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """By which borders a pixel touches (bits: top, bottom, left, right): which of its 8 neighbours are
    inside the image [16, 8], and D, the sum of their weights [16] (12 inside, 8 on an edge, 5 in a corner)."""
    inside = torch.ones(16, 8, dtype=torch.bool)
    for code in range(16):
        for j, (dy, dx, _) in enumerate(NEIGHBOURS):
            top, bottom, left, right = code & 1, code & 2, code & 4, code & 8
            inside[code, j] = not ((top and dy < 0) or (bottom and dy > 0) or (left and dx < 0) or (right and dx > 0))
    weights = torch.tensor([float(weight) for _, _, weight in NEIGHBOURS], dtype=torch.float64)
    return inside, (inside * weights).sum(dim=1)


_INSIDE, _DIAGONAL = _border_tables()


_cache = threading.local()


def _lookup(size: int, device: torch.device) -> torch.Tensor:
    """The calling thread's int64 scratch of at least ``size`` values on ``device``, reused from call to
    call (only the positions a call writes are read, so it is never cleared): a fresh one would cost a
    page fault per 4 KiB touched, several times the rest of a solve at 1 % removed."""
    buffer = getattr(_cache, "lookup", None)
    if buffer is None or buffer.device != device or len(buffer) < size:
        _cache.lookup = None
        buffer = _cache.lookup = torch.empty(size, dtype=torch.int64, device=device)
    return buffer


def _groups(links: torch.Tensor, plane: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Label the 8-connected groups of pixels whose neighbours (indices among them, [G, 8], a pixel's own
    index where it has none) are ``links``: each pixel gets the smallest index of its group.

    Every label is the index of a pixel of the same group, never larger than the pixel's own. Each round
    hooks: the pixel a label points to takes the smallest label around the pixel (a scatter-min); then
    two shortcuts (a label's own label). The labels stop changing only when each group carries its
    smallest index. Integer minima only: exact in any order, whatever else is labelled beside. A group of
    at most ``LARGEST`` pixels settles in fewer rounds; the planes still changing after ``LARGEST``
    rounds are returned as unsettled (they go to the sparse factorisation, which is exact for any mask)."""
    label = torch.arange(len(links), device=links.device)
    for _ in range(LARGEST):
        low = label
        for column in label.index_select(0, links.view(-1)).view(links.shape).unbind(dim=1):
            low = torch.minimum(low, column)
        hooked = label.clone().scatter_reduce_(0, label, low, reduce="amin")
        hooked = hooked.index_select(0, hooked)
        hooked = hooked.index_select(0, hooked)
        changed = hooked != label
        label = hooked
        if not bool(changed.any()):
            return label, plane[:0]
    return label, plane[changed].unique()


def _solve_groups(
    label: torch.Tensor,
    links: torch.Tensor,
    linked: torch.Tensor,
    members: torch.Tensor,
    diagonal: torch.Tensor,
    rhs: torch.Tensor,
    g: int,
) -> torch.Tensor:
    """The solution [R, n] float64 of grouped pixels in groups of 2–LARGEST pixels: ``members`` their
    indices among all G grouped pixels (ascending), ``label`` their group labels, ``links`` [n, 8] and
    ``linked`` their neighbours (indices among the G) and which of them are removed; ``rhs`` [R, n]."""
    device, r, n_all = members.device, rhs.shape[0], len(members)
    # Sort by padded size, then group, then raster order (stable): every padded size is one contiguous
    # range, every group a contiguous run in it; ``local`` is a pixel's place in its group.
    size = torch.bincount(label, minlength=g).index_select(0, label)
    padded = _PADDED.to(device).index_select(0, size)
    order = torch.sort(padded * g + label, stable=True).indices
    key = (padded * g + label).index_select(0, order)
    first = torch.ones(n_all, dtype=torch.bool, device=device)
    first[1:] = key[1:] != key[:-1]
    group = torch.cumsum(first, 0) - 1  # of each sorted pixel
    positions = torch.arange(n_all, device=device)
    local = positions - torch.where(first, positions, 0).cummax(0).values
    local_of = torch.empty(g, dtype=torch.int64, device=device).index_copy_(0, members.index_select(0, order), local)
    # The sorted pixels' data, and each removed neighbour's place in its group.
    diagonal, rhs, linked = diagonal.index_select(0, order), rhs.index_select(1, order), linked.index_select(0, order)
    partner = local_of.index_select(0, links.index_select(0, order).view(-1)).view(links.shape)
    padded = padded.index_select(0, order)
    solution = torch.empty(r, n_all, dtype=torch.float64, device=device)
    counts = torch.bincount(padded, minlength=LARGEST + 1).tolist()
    a = 0
    for n in _SYSTEM_SIZES:
        if not counts[n]:
            continue
        b = a + counts[n]
        # The groups padded to n pixels as augmented systems [groups, n, n + R], written through flat
        # indices: identity (padding rows), D, −a_ij between linked pixels, b.
        m, rows = n + r, group[a:b] - group[a]
        count = int(rows[-1]) + 1
        start = rows * (n * m) + local[a:b] * m  # each pixel's row
        system = torch.zeros(count * n * m, dtype=torch.float64, device=device)
        system.view(count, n * m)[:, :: m + 1] = 1.0
        system.index_copy_(0, start + local[a:b], diagonal[a:b])
        on = linked[a:b].nonzero()  # (pixel, direction) of every link
        system.index_copy_(
            0,
            start.index_select(0, on[:, 0]) + partner[a:b].reshape(-1).index_select(0, on[:, 0] * 8 + on[:, 1]),
            _LINK_WEIGHTS.to(device).index_select(0, on[:, 1]),
        )
        rhs_at = (start + n)[None, :] + torch.arange(r, device=device)[:, None]
        system.index_copy_(0, rhs_at.view(-1), rhs[:, a:b].reshape(-1))
        _gauss_jordan(system.view(count, n, m), n)
        solution[:, a:b] = system.index_select(0, rhs_at.view(-1)).view(r, b - a)
        a = b
    return torch.empty_like(solution).index_copy_(1, order, solution)


_SYSTEM_SIZES = (2, 3, 4, 6, 8, 12, 16)
"""The sizes of the dense systems: a group is padded to the first that holds it (Gauss–Jordan costs n²(n + R)
per system, so close sizes save more than the extra calls cost)."""

_PADDED = torch.tensor([0, 1] + [next(n for n in _SYSTEM_SIZES if n >= k) for k in range(2, LARGEST + 1)])
"""A group's size padded to its system's size, by group size."""

_LINK_WEIGHTS = torch.tensor([-float(weight) for _, _, weight in NEIGHBOURS], dtype=torch.float64)


def _gauss_jordan(system: torch.Tensor, n: int) -> None:
    """Reduce augmented systems [G, n, n + R] in place to [I | solution], without pivoting, by
    element-wise operations only (each exactly rounded: a system's result does not depend on the others)."""
    for p in range(n):
        pivot = system[:, p, p:] / system[:, p, p : p + 1]
        factor = system[:, :, p : p + 1] * _others(n, p, system.device)
        system[:, :, p:] -= factor * pivot[:, None, :]
        system[:, p, p:] = pivot


def _others(n: int, p: int, device: torch.device) -> torch.Tensor:
    """[n, 1] float64: 1, and 0 at row p (the pivot row is not eliminated from itself)."""
    others = torch.ones(n, 1, dtype=torch.float64, device=device)
    others[p] = 0.0
    return others
