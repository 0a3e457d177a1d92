"""Which positions of an image to replace: the ranking and masks shared by ROAR, KAR and the perturbation curves.

ROAR and KAR (Hooker et al., "A Benchmark for Interpretability Methods in Deep Neural Networks",
NeurIPS 2019) rank the positions of every image by its attribution map; for a threshold t, ROAR
replaces the top t% and KAR *keeps* the top t% and replaces all the others. The perturbation
curves (MoRF/LeRF, ROAD) remove the most or least relevant positions for many fractions of one
ranking. All of them are built from ``ranks``: the rank of every position (0 = most relevant),
computed with one sort, after which the mask for any fraction is a single comparison.

Ties. Many maps hold large sets of equal values: GradCAM maps upsampled from a 4×4 or 7×7 grid,
clipped maps (ReLU) full of zeros, constant control maps, float16-quantised maps. A plain sort breaks
ties by scan order, which removes whole top rows first and hands the classifier a spatial bias
unrelated to the method. Here ties are broken by a fixed pseudo-random key per (seed, image index,
position), computed with an integer hash: deterministic, the same on CPU and CUDA, and the same for
an image whatever batch, batch position or data-loader worker it arrives in.

Counting. The number of positions removed (ROAR, MoRF, LeRF) or kept (KAR) for a fraction f of P
positions is ``count(f, P)``: f·P rounded half up (not Python's round-half-to-even), computed from
the decimal value of f so that, e.g., 0.3·5 = 1.5 counts 2 although 0.3·5 is 1.4999… in binary.
Exactly that many positions are selected even when values tie.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

from roar.core.sorting import sorted_rows

GRANULARITIES = ("pixel", "element")
MODES = ("roar", "kar", "morf", "lerf")
"""``roar``/``morf``: replace the top k positions. ``kar``: keep the top k, replace the other P − k.
``lerf``: replace the bottom k (the least relevant first; *not* KAR, which keeps the top k)."""

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


# --------------------------------------------------------------------------------------------- hashing


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2^32 for 0 ≤ x < 2^32 without int64 overflow (signed overflow is not something to rely on).

    c is split into 16-bit halves: x·c_lo < 2^48 and x·c_hi < 2^48, so every product fits in int64.
    """
    lo = x * (c & _MASK16)
    hi = ((x * (c >> 16)) & _MASK16) << 16
    return (lo + hi) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser ("lowbias32", C. Wellons) on int64 tensors holding values in [0, 2^32).

    Right shifts act on non-negative values, so arithmetic and logical shifts agree.
    """
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash_words(state: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Absorb the int64 ``value`` (its two 32-bit words) into the 32-bit ``state``."""
    state = _hash32(state ^ (value & _MASK32))
    return _hash32(state ^ ((value >> 32) & _MASK32))


def tie_break_keys(indices: torch.Tensor, n_positions: int, seed: int, device: Any = None) -> torch.Tensor:
    """A fixed pseudo-random int64 key in [0, 2^63) for every (seed, image index, position): [B, n_positions].

    The key depends on nothing but those three numbers, so an image gets the same keys in a batch of
    one or of 512, at any batch position, in any worker, on CPU or CUDA (integer arithmetic only).
    Two independent 32-bit hashes make a 63-bit key, so two positions of one image practically never
    share a key (were they to, the lower position would come first).
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    indices = torch.as_tensor(indices)
    device = torch.device(device) if device is not None else indices.device
    indices = indices.to(device=device, dtype=torch.int64).reshape(-1)
    seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
    positions = torch.arange(n_positions, dtype=torch.int64, device=device)
    words = []
    for stream in (0x243F6A88, 0x85A308D3):  # two independent streams (digits of pi)
        state = _hash_words(torch.full((), stream, dtype=torch.int64, device=device), seed_t)
        state = _hash_words(state, indices)  # [B]
        state = _hash32(state[:, None] ^ positions[None, :])  # [B, P]
        words.append(_hash32(state ^ 0x9E3779B9))
    return ((words[0] & 0x7FFFFFFF) << 32) | words[1]


# --------------------------------------------------------------------------------------------- ranking


def _positions(maps: torch.Tensor, granularity: str) -> torch.Tensor:
    """The map as [B, 1, H, W] (pixel) or [B, C, H, W] (element), after checking shape and values."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "pixel":
        if maps.ndim == 3:
            maps = maps[:, None]
        elif maps.ndim != 4 or maps.shape[1] != 1:
            raise ValueError(
                f"pixel granularity ranks H×W positions and needs maps [B, H, W] or [B, 1, H, W], got "
                f"{tuple(maps.shape)}: reduce a [B, C, H, W] map over channels first (the reduction is recorded "
                "with the maps) or use element granularity"
            )
    elif maps.ndim != 4:
        raise ValueError(f"element granularity needs maps [B, C, H, W], got {tuple(maps.shape)}")
    if maps.is_floating_point():
        if torch.isnan(maps).any():
            raise ValueError("attribution maps contain NaN: the ranking is undefined (recompute or repair the maps)")
        if maps.dtype in (torch.float16, torch.bfloat16):
            maps = maps.float()
    elif maps.dtype == torch.bool or maps.is_complex():
        raise ValueError(f"attribution maps must be real numbers, got {maps.dtype}")
    return maps


def ranking(maps: torch.Tensor, indices: torch.Tensor, seed: int, granularity: str = "pixel") -> torch.Tensor:
    """Positions from most to least relevant, [B, P], as flat indices into the map's positions.

    Pixel granularity: ``maps`` [B, H, W] or [B, 1, H, W], P = H·W (a multi-channel map is refused:
    how channels are reduced is a recorded choice, not something to guess here). Element granularity:
    ``maps`` [B, C, H, W], P = C·H·W. Higher value = more relevant; equal values are ordered by
    ``tie_break_keys(indices, P, seed)``, never by scan order. NaN in a map is a ValueError.
    """
    maps = _positions(maps, granularity)
    b = maps.shape[0]
    values = maps.reshape(b, -1)
    keys = tie_break_keys(indices, values.shape[1], seed, values.device)
    if keys.shape[0] != b:
        raise ValueError(f"{keys.shape[0]} indices for {b} maps")
    # Stable sorts: first by key, then by value descending; equal values keep their key order.
    by_key = torch.sort(keys, dim=1, stable=True).indices
    by_value = torch.sort(values.gather(1, by_key), dim=1, descending=True, stable=True).indices
    return by_key.gather(1, by_value)


def _keys_where(rows: torch.Tensor, indices: torch.Tensor, n_positions: int, seed: int) -> torch.Tensor:
    """``tie_break_keys`` of the images at ``rows`` only: most rows have no tie to break."""
    indices = torch.as_tensor(indices).reshape(-1)
    return tie_break_keys(indices.to(rows.device)[rows], n_positions, seed, rows.device)


def _flat_values(maps: torch.Tensor, indices: torch.Tensor, granularity: str) -> torch.Tensor:
    """The checked maps as [B, P], refused if the indices do not match them."""
    maps = _positions(maps, granularity)
    values = maps.reshape(maps.shape[0], -1)
    if torch.as_tensor(indices).numel() != values.shape[0]:
        raise ValueError(f"{torch.as_tensor(indices).numel()} indices for {values.shape[0]} maps")
    return values


def top_position(maps: torch.Tensor, indices: torch.Tensor, seed: int, granularity: str = "pixel") -> torch.Tensor:
    """``ranking(maps, indices, seed, granularity)[:, 0]``, the flat index of each map's most relevant
    position, [B], in one pass instead of a sort: among the positions holding the maximum, the one
    with the smallest tie-break key (the pointing game asks for nothing more). The keys are computed
    only for the maps whose maximum is tied."""
    values = _flat_values(maps, indices, granularity)
    at_max = values == values.amax(1, keepdim=True)
    top = values.argmax(1)
    tied = (at_max.sum(1) > 1).nonzero().squeeze(1)
    if len(tied):
        keys = _keys_where(tied, indices, values.shape[1], seed)
        top[tied] = keys.masked_fill(~at_max[tied], torch.iinfo(torch.int64).max).argmin(1)
    return top


def top_mask(
    maps: torch.Tensor, indices: torch.Tensor, seed: int, k: torch.Tensor | int, granularity: str = "pixel"
) -> torch.Tensor:
    """``ranks(maps, indices, seed, granularity).flatten(1) < k[:, None]``: bool [B, P], True on the
    k[b] most relevant positions of map b (``k`` an int or [B] ints, clipped to [0, P]).

    The same set as the full ranking without its two sorts by key and value: the k-th largest
    value v (one sort of the values, ``roar.core.sorting``) splits each map into the positions
    above v, all taken, and those equal to v, of which the ones with the smallest tie-break keys
    fill the remaining places. The keys are computed only for maps whose boundary value is shared
    by more positions than places remain.
    """
    values = _flat_values(maps, indices, granularity)
    b, p = values.shape
    k = torch.as_tensor(k, dtype=torch.int64, device=values.device).expand(b).clamp(0, p)
    if b == 0 or int(k.max()) == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    boundary = sorted_rows(values).to(values.device).gather(1, (p - k).clamp_max(p - 1)[:, None])
    above, at = values > boundary, values == boundary
    places = k - above.sum(1)  # how many of the positions at the boundary value are taken
    chosen = above | (at & (places > 0)[:, None])
    crowded = ((places > 0) & (at.sum(1) > places)).nonzero().squeeze(1)
    if len(crowded):
        keys = _keys_where(crowded, indices, p, seed).masked_fill(~at[crowded], torch.iinfo(torch.int64).max)
        order = keys.sort(dim=1, stable=True).indices  # the tied positions first, by key
        taken = torch.arange(p, device=values.device)[None, :] < places[crowded][:, None]
        ties = torch.zeros_like(at[crowded]).scatter_(1, order, taken)
        chosen[crowded] = above[crowded] | ties
    return chosen


def ranks(maps: torch.Tensor, indices: torch.Tensor, seed: int, granularity: str = "pixel") -> torch.Tensor:
    """The rank of every position (0 = most relevant), int64, shaped [B, 1, H, W] (pixel) or [B, C, H, W] (element).

    The singleton channel of pixel ranks broadcasts against images [B, C, H, W]. One sort serves every
    fraction: ``mask_from_ranks(r, f, mode)`` is a comparison with a count.
    """
    shape = _positions(maps, granularity).shape
    order = ranking(maps, indices, seed, granularity)
    b, p = order.shape
    out = torch.empty_like(order)
    out.scatter_(1, order, torch.arange(p, dtype=order.dtype, device=order.device).expand(b, p))
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------- masks


def count(fraction: float, n_positions: int) -> int:
    """round(fraction · n_positions), halves rounded up, from the decimal value of ``fraction``.

    ``int(math.floor(f · n + 0.5))`` in exact rational arithmetic on ``repr(f)``: no banker's
    rounding (Python's ``round(2.5) == 2``) and no binary surprises (``0.3 * 5 == 1.4999999999999998``).
    """
    fraction = float(fraction)
    if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return math.floor(Fraction(repr(fraction)) * int(n_positions) + Fraction(1, 2))


def select(ranks: torch.Tensor, k: int, n_positions: int, mode: str = "roar") -> torch.Tensor:
    """The one removal rule (True = replaced) for ``k`` of ``n_positions`` ranked positions.

    ``roar``/``morf`` replace ranks < k; ``kar`` keeps ranks < k and replaces the other P − k (KAR
    with k = 0 keeps nothing, so everything is replaced); ``lerf`` replaces ranks ≥ P − k. ``ranks``
    may carry one rank per pixel while P counts coarser positions (patches share their rank).
    """
    if mode in ("roar", "morf"):
        return ranks < k
    if mode == "kar":
        return ranks >= k
    if mode == "lerf":
        return ranks >= n_positions - k
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def mask_from_ranks(
    ranks: torch.Tensor, fraction: float, mode: str = "roar", channels: int | None = None
) -> torch.Tensor:
    """The replaced positions (True = replaced) for one fraction of an existing ranking.

    ``ranks`` [B, 1, H, W] or [B, C, H, W] from ``ranks()``; P = C·H·W of one map, k = ``count(fraction, P)``,
    replaced as ``select`` says. With ``channels`` a pixel mask [B, 1, H, W] is expanded to
    [B, channels, H, W] (the same mask for every channel of a pixel); an element mask must already
    have that many channels.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if ranks.ndim != 4:
        raise ValueError(f"ranks must be [B, C, H, W] or [B, 1, H, W], got {tuple(ranks.shape)}")
    p = math.prod(ranks.shape[1:])
    mask = select(ranks, count(fraction, p), p, mode)
    if channels is not None and mask.shape[1] != channels:
        if mask.shape[1] != 1:
            raise ValueError(f"an element mask with {mask.shape[1]} channels cannot be applied to {channels}")
        mask = mask.expand(-1, channels, -1, -1)
    return mask


def removal_mask(
    maps: torch.Tensor,
    indices: torch.Tensor,
    fraction: float,
    mode: str = "roar",
    seed: int = 0,
    granularity: str = "pixel",
    channels: int = 3,
) -> torch.Tensor:
    """bool [B, channels, H, W], True where the image is replaced: ROAR removes exactly the top
    ``count(fraction, P)`` positions, KAR keeps exactly them and removes the rest (see ``MODES``).

    Pixel granularity replaces every channel of a selected pixel; element granularity ranks the
    C·H·W scalars of a [B, C, H, W] map independently (its C must equal ``channels``).
    """
    if granularity == "element" and maps.ndim == 4 and maps.shape[1] != channels:
        raise ValueError(f"element granularity: the maps have {maps.shape[1]} channels, the images {channels}")
    return mask_from_ranks(ranks(maps, indices, seed, granularity), fraction, mode, channels)
