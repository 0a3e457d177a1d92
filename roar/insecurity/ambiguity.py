"""Ambiguities and insecurity maps of deliberative explanations (Wang & Vasconcelos, NeurIPS 2019).

A deliberative explanation answers "which regions made the classifier hesitate, and between which
classes?". Its inputs, per image, at the resolution h×w of a chosen feature layer:

* class maps A [B, T, h, w], one per top predicted class (T = 5, ordered by descending logit;
  ``top`` [B, T] holds their class ids), values ≥ 0 (negatives clipped);
* a difficulty map D [B, h, w] ≥ 0, where the network's difficulty score grows with the features.

An *ambiguity* is a pair of classes that compete somewhere: at each location the ``per_location``
(3) classes with the largest class-map values; every pair of them; the unique pairs over all the
image's locations. Its *insecurity map* I = A_a ⊙ A_b ⊙ D is large where both classes are present
and the network finds the image hard, upsampled bilinearly (``align_corners=False``, as
``roar.attribution.gradcam`` upsamples its maps) to the image size.

Pairs are named by *rank*, not class id: slot s of ``PAIRS`` (or ``rank_pairs(T)``) is the pair of
ranks ``itertools.combinations(range(T), 2)[s]``, so every image has the same P = T(T−1)/2 slots
and per-image results stack into dense [B, P] tensors; ``pair_classes`` turns slots into class ids.

Clarification of the paper's rule: only classes whose map is > 0 at a location count there. Maps
clipped at 0 are all zero on the background, and picking "the 3 largest" of five zeros by an
arbitrary tie-break would make almost every pair an ambiguity of every image. A location with
fewer than two positive classes contributes no pair. Ties between positive values are broken
towards the higher-ranked class (larger logit), so the result never depends on sort internals.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

TOP = 5
"""The number of top predicted classes that get a class map (the paper's T)."""


def rank_pairs(t: int) -> list[tuple[int, int]]:
    """The fixed enumeration of the rank pairs (i, j), i < j < t: slot s is ``rank_pairs(t)[s]``.

    Lexicographic (``itertools.combinations``), so pairs of higher-ranked classes get lower slots:
    (0, 1), (0, 2), …, (t−2, t−1).
    """
    if t < 2:
        raise ValueError(f"a pair needs at least 2 classes, got T = {t}")
    return list(itertools.combinations(range(t), 2))


PAIRS: tuple[tuple[int, int], ...] = tuple(rank_pairs(TOP))
"""The P = 10 slots for T = 5: (0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)."""


def _slots(t: int, device: torch.device) -> torch.Tensor:
    """int64 [P, 2]: the ranks of each slot, as an index tensor."""
    return torch.tensor(rank_pairs(t), dtype=torch.int64, device=device)


def _slot_table(t: int, device: torch.device) -> torch.Tensor:
    """int64 [T, T]: the slot of the rank pair {i, j} in either order (−1 on the diagonal)."""
    table = torch.full((t, t), -1, dtype=torch.int64, device=device)
    slots = _slots(t, device)
    ids = torch.arange(len(slots), device=device)
    table[slots[:, 0], slots[:, 1]] = ids
    table[slots[:, 1], slots[:, 0]] = ids
    return table


def _check_class_maps(class_maps: torch.Tensor) -> None:
    """Refuse what would silently give wrong pairs or maps: a wrong shape, NaN, negative values.

    Negative values are refused rather than clipped here: the product of two negative class maps
    is positive, so an unclipped map would invent insecurity; clipping is the caller's recorded choice.
    """
    if class_maps.ndim != 4 or class_maps.shape[1] < 2:
        raise ValueError(f"class maps must be [B, T, h, w] with T ≥ 2, got {tuple(class_maps.shape)}")
    if not class_maps.is_floating_point():
        raise ValueError(f"class maps must be floating point, got {class_maps.dtype}")
    if torch.isnan(class_maps).any():
        raise ValueError("class maps contain NaN")
    if (class_maps < 0).any():
        raise ValueError("class maps must be ≥ 0: clip them first (maps.clamp(min=0))")


def _check_pairs(pairs: torch.Tensor, b: int, p: int) -> None:
    if pairs.dtype != torch.bool or tuple(pairs.shape) != (b, p):
        raise ValueError(f"pairs must be bool [B, P] = [{b}, {p}], got {pairs.dtype} {tuple(pairs.shape)}")


def ambiguous_pairs(class_maps: torch.Tensor, per_location: int = 3) -> torch.Tensor:
    """bool [B, P]: True in the slots (``rank_pairs(T)``) of the pairs of classes that compete in the image.

    At every location, the ``per_location`` ranks with the largest positive class-map values (ties
    to the higher-ranked class), every pair of them, united over the locations. Only values > 0
    count (see the module docstring); a location with fewer than two positive classes adds nothing.
    ``per_location`` larger than T means all T classes.
    """
    _check_class_maps(class_maps)
    if per_location < 2:
        raise ValueError(f"per_location must be ≥ 2 to form a pair, got {per_location}")
    b, t = class_maps.shape[:2]
    k = min(per_location, t)
    values = class_maps.flatten(2).transpose(1, 2)  # [B, L, T]
    # A stable descending sort over the T classes rather than topk: topk leaves the order of ties
    # unspecified, the stable sort puts the lower rank (larger logit) first.
    ordered, ranks = torch.sort(values, dim=-1, descending=True, stable=True)
    ordered, ranks = ordered[..., :k], ranks[..., :k]
    within = _slots(k, class_maps.device)  # pairs of positions within the top k: [k(k−1)/2, 2]
    slots = _slot_table(t, class_maps.device)[ranks[..., within[:, 0]], ranks[..., within[:, 1]]]
    # Positions are in descending order, so the pair is positive when its second (smaller) value is.
    present = ordered[..., within[:, 1]] > 0  # [B, L, k(k−1)/2]
    out = torch.zeros(b, t * (t - 1) // 2, dtype=torch.int32, device=class_maps.device)
    out.scatter_reduce_(1, slots.flatten(1), present.flatten(1).to(torch.int32), reduce="amax")
    return out.bool()


def pair_classes(top: torch.Tensor) -> torch.Tensor:
    """int64 [B, P, 2]: the class ids (from ``top`` [B, T], descending by logit) of every slot's two ranks."""
    if top.ndim != 2 or top.shape[1] < 2:
        raise ValueError(f"top must be [B, T] with T ≥ 2, got {tuple(top.shape)}")
    return top.to(torch.int64)[:, _slots(top.shape[1], top.device)]


def insecurity_maps(
    class_maps: torch.Tensor,
    difficulty: torch.Tensor,
    pairs: torch.Tensor,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """float [B, P, H, W]: I = A_a ⊙ A_b ⊙ D of every slot (a, b), exactly 0 in slots that are no ambiguity.

    The product is taken at the feature resolution h×w, where the maps were computed, and then
    upsampled bilinearly (``align_corners=False``) to ``size`` = (H, W), the image's size (``None``
    keeps h×w). Upsampling the product rather than the factors keeps I the paper's quantity and
    costs one interpolation. Computed in float32 at least (float64 stays float64).
    """
    _check_class_maps(class_maps)
    b, t, h, w = class_maps.shape
    if tuple(difficulty.shape) != (b, h, w):
        raise ValueError(f"difficulty must be [B, h, w] = [{b}, {h}, {w}], got {tuple(difficulty.shape)}")
    if torch.isnan(difficulty).any() or (difficulty < 0).any():
        raise ValueError("the difficulty map must be ≥ 0 and free of NaN: clip it first (maps.clamp(min=0))")
    _check_pairs(pairs, b, t * (t - 1) // 2)
    dtype = torch.promote_types(class_maps.dtype, torch.float32)
    maps = class_maps.to(dtype)
    slots = _slots(t, class_maps.device)
    product = maps[:, slots[:, 0]] * maps[:, slots[:, 1]] * difficulty.to(dtype)[:, None]  # [B, P, h, w]
    if size is not None and tuple(size) != (h, w):
        product = upsample(product, size)
    return torch.where(pairs[:, :, None, None], product, torch.zeros((), dtype=dtype, device=product.device))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps [..., h, w] bilinearly (``align_corners=False``) to [..., H, W]: the one way every
    insecurity, difficulty and class map reaches the image's size."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    return F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False).reshape(*lead, *size)


def strongest_pair(insecurity: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the slot of the image's ambiguity with the largest total insecurity, −1 for an image with none.

    Totals are summed in float64 so large maps do not lose the comparison to rounding; equal totals
    go to the lower slot (the pair of higher-ranked classes), as ``argmax`` returns the first maximum.
    """
    if insecurity.ndim != 4:
        raise ValueError(f"insecurity maps must be [B, P, H, W], got {tuple(insecurity.shape)}")
    return strongest_slot(insecurity.to(torch.float64).sum(dim=(2, 3)), pairs)


def strongest_slot(totals: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the slot of the largest total [B, P] among the image's ambiguities, −1 for none
    (``strongest_pair`` from totals already summed, e.g. those a store keeps)."""
    _check_pairs(pairs, *totals.shape)
    best = totals.masked_fill(~pairs, -torch.inf).argmax(dim=1)
    return torch.where(pairs.any(dim=1), best, torch.full_like(best, -1))


def pair_match(
    pair_classes: torch.Tensor,
    pairs: torch.Tensor,
    strongest: torch.Tensor,
    label: torch.Tensor,
    other: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Whether the unordered class pair {label, other} was found, per image: bool [B] under two keys.

    ``any``: it is one of the image's ambiguities; ``strongest``: it is the ambiguity in slot
    ``strongest`` (from ``strongest_pair``; −1 never matches). ``label`` and ``other`` are class ids,
    [B] each; order does not matter, since an ambiguity is between two classes, not from one to another.
    """
    if pair_classes.ndim != 3 or pair_classes.shape[2] != 2:
        raise ValueError(f"pair_classes must be [B, P, 2], got {tuple(pair_classes.shape)}")
    b, p = pair_classes.shape[:2]
    _check_pairs(pairs, b, p)
    device = pair_classes.device
    label, other, strongest = (torch.as_tensor(x, device=device).reshape(-1) for x in (label, other, strongest))
    if not len(label) == len(other) == len(strongest) == b:
        raise ValueError(f"label, other and strongest need one value per image ({b})")
    first, second = pair_classes[..., 0], pair_classes[..., 1]
    same = ((first == label[:, None]) & (second == other[:, None])) | (
        (first == other[:, None]) & (second == label[:, None])
    )
    match = same & pairs  # [B, P]
    found = strongest >= 0
    at_strongest = match.gather(1, strongest.clamp(min=0).to(torch.int64)[:, None])[:, 0]
    return {"any": match.any(dim=1), "strongest": at_strongest & found}
