"""Deliberative explanations: ambiguous pairs, insecurity maps, the strongest pair, and the precision/recall
evaluation of binarised maps, each on inputs whose answer is known by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from roar.insecurity import evaluation
from roar.insecurity.ambiguity import (
    PAIRS,
    ambiguous_pairs,
    insecurity_maps,
    pair_classes,
    pair_match,
    rank_pairs,
    strongest_pair,
)
from roar.insecurity.evaluation import DEFAULT_FRACTIONS, pr_area, precision_recall
from roar.perturb.ranking import ranks


def slots(*rank_pairs_: tuple[int, int]) -> torch.Tensor:
    """bool [P]: True in the slots of the given rank pairs (T = 5)."""
    out = torch.zeros(len(PAIRS), dtype=torch.bool)
    for pair in rank_pairs_:
        out[PAIRS.index(pair)] = True
    return out


# --------------------------------------------------------------------------------------------- pairs


def test_the_slots_are_the_combinations_of_ranks():
    assert list(PAIRS) == list(itertools.combinations(range(5), 2)) == rank_pairs(5)
    assert len(PAIRS) == 10


def hand_maps() -> torch.Tensor:
    """[2, 5, 2, 3]: image 0 has six locations with known top classes, image 1 is all zero."""
    locations = [
        [5.0, 4.0, 3.0, 2.0, 1.0],  # top 3: ranks 0, 1, 2
        [0.0, 0.0, 0.0, 1.0, 2.0],  # two positive classes: only (3, 4)
        [0.0, 0.0, 7.0, 0.0, 0.0],  # one positive class: no pair
        [0.0, 0.0, 0.0, 0.0, 0.0],  # background: no pair
        [0.5, 0.0, 2.0, 3.0, 4.0],  # four positive: top 3 are ranks 4, 3, 2; rank 0 is fourth
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]
    image = torch.tensor(locations).T.reshape(5, 2, 3)
    return torch.stack([image, torch.zeros_like(image)])


def test_pairs_are_the_unique_pairs_of_the_top_positive_classes_at_each_location():
    found = ambiguous_pairs(hand_maps())
    assert found.dtype == torch.bool and found.shape == (2, 10)
    assert torch.equal(found[0], slots((0, 1), (0, 2), (1, 2), (3, 4), (2, 3), (2, 4)))
    assert not found[1].any(), "an all-zero image has no ambiguity, whatever the tie-break"


def test_pairs_with_two_classes_per_location():
    found = ambiguous_pairs(hand_maps(), per_location=2)
    assert torch.equal(found[0], slots((0, 1), (3, 4)))


def test_positive_ties_go_to_the_higher_ranked_classes():
    maps = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]).reshape(1, 5, 1, 1)
    assert torch.equal(ambiguous_pairs(maps)[0], slots((0, 1), (0, 2), (1, 2)))


def test_negative_or_nan_class_maps_are_refused():
    with pytest.raises(ValueError, match="≥ 0"):
        ambiguous_pairs(-hand_maps() - 1)
    with pytest.raises(ValueError, match="NaN"):
        ambiguous_pairs(torch.full((1, 5, 2, 2), math.nan))


# --------------------------------------------------------------------------------------------- maps


def test_pair_classes_map_slots_to_class_ids():
    top = torch.tensor([[10, 20, 30, 40, 50], [7, 3, 9, 1, 4]])
    classes = pair_classes(top)
    assert classes.dtype == torch.int64 and classes.shape == (2, 10, 2)
    for s, (i, j) in enumerate(PAIRS):
        assert classes[:, s].tolist() == [[top[0, i], top[0, j]], [top[1, i], top[1, j]]]
    assert classes[0, PAIRS.index((3, 4))].tolist() == [40, 50]


def test_insecurity_is_the_product_of_the_two_class_maps_and_the_difficulty():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 5, 3, 4, generator=generator)
    difficulty = torch.rand(2, 3, 4, generator=generator)
    pairs = torch.stack([slots((0, 1), (2, 4)), slots((3, 4))])
    feature = insecurity_maps(maps, difficulty, pairs, size=(3, 4))
    assert feature.shape == (2, 10, 3, 4)
    for b in range(2):
        for s, (i, j) in enumerate(PAIRS):
            expected = maps[b, i] * maps[b, j] * difficulty[b] if pairs[b, s] else torch.zeros(3, 4)
            assert torch.equal(feature[b, s], expected), (b, s)

    upsampled = insecurity_maps(maps, difficulty, pairs, size=(12, 20))
    assert upsampled.shape == (2, 10, 12, 20)
    expected = F.interpolate(feature, size=(12, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsampled, expected, rtol=0, atol=1e-7)
    assert (upsampled[~pairs] == 0).all(), "slots that are no ambiguity are exactly zero"


def two_objects():
    """Class maps [1, 5, 4, 8] of an image with two objects: class 3 (rank 1) peaks on the left object,
    class 9 (rank 2) on the right; the other three are faint everywhere (0.05, 0.04, 0.03)."""
    h, w = 4, 8
    y, x = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")

    def blob(cx: float) -> torch.Tensor:
        return torch.exp(-((x - cx) ** 2 + (y - 1.5) ** 2) / (2 * 1.5**2))

    faint = [torch.full((h, w), v) for v in (0.05, 0.04, 0.03)]
    maps = torch.stack([faint[0], blob(1.5), blob(5.5), faint[1], faint[2]])[None]
    top = torch.tensor([[7, 3, 9, 1, 4]])
    difficulty = torch.ones(1, h, w)
    return maps, difficulty, top


def test_the_two_objects_make_the_strongest_ambiguity():
    maps, difficulty, top = two_objects()
    pairs = ambiguous_pairs(maps)
    slot = PAIRS.index((1, 2))
    assert pairs[0, slot]
    assert not pairs[0, [PAIRS.index((k, 4)) for k in range(4)]].any(), "the faintest class is never in a top 3"

    insecurity = insecurity_maps(maps, difficulty, pairs, size=(32, 64))
    strongest = strongest_pair(insecurity, pairs)
    assert strongest.tolist() == [slot]
    classes = pair_classes(top)
    assert classes[0, slot].tolist() == [3, 9]

    def match(label: int, other: int) -> dict[str, bool]:
        out = pair_match(classes, pairs, strongest, torch.tensor([label]), torch.tensor([other]))
        return {key: bool(value) for key, value in out.items()}

    assert match(3, 9) == {"any": True, "strongest": True}
    assert match(9, 3) == {"any": True, "strongest": True}, "a pair is unordered"
    assert match(3, 7) == {"any": True, "strongest": False}, "3 and the faint 7 compete on the left object"
    assert match(3, 4) == {"any": False, "strongest": False}
    assert match(3, 42) == {"any": False, "strongest": False}


def test_an_image_without_ambiguity_has_no_strongest_pair():
    maps = torch.zeros(2, 5, 2, 2)
    maps[0, 1:3] = 1.0
    pairs = ambiguous_pairs(maps)
    strongest = strongest_pair(insecurity_maps(maps, torch.ones(2, 2, 2), pairs), pairs)
    assert strongest.tolist() == [PAIRS.index((1, 2)), -1]
    classes = pair_classes(torch.arange(10).reshape(2, 5))
    out = pair_match(classes, pairs, strongest, torch.tensor([1, 5]), torch.tensor([2, 6]))
    assert out["any"].tolist() == [True, False] and out["strongest"].tolist() == [True, False]


# --------------------------------------------------------------------------------------------- precision/recall


def test_precision_and_recall_of_a_hand_made_map():
    map_ = torch.arange(16, 0, -1, dtype=torch.float32).reshape(1, 4, 4)  # pixel p has rank p
    region = torch.zeros(1, 16, dtype=torch.bool)
    region[0, [0, 2, 5, 6, 12, 15]] = True  # two of the top 4, two more of the top 8
    precision, recall = precision_recall(map_, region.reshape(1, 4, 4), [0.01, 0.25, 0.5, 1.0])
    assert precision.dtype == recall.dtype == torch.float64 and precision.shape == (1, 4)
    # r = 0.01 is round(0.16) = 0 pixels, raised to 1: the top pixel, inside.
    assert precision[0].tolist() == [1.0, 2 / 4, 4 / 8, 6 / 16]
    assert recall[0].tolist() == [1 / 6, 2 / 6, 4 / 6, 1.0]


def test_recall_is_nan_on_an_empty_region_and_precision_zero():
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1))
    regions = torch.zeros(2, 4, 4, dtype=torch.bool)
    regions[1, :2] = True
    precision, recall = precision_recall(maps, regions, [0.25, 1.0])
    assert torch.isnan(recall[0]).all() and (precision[0] == 0).all()
    assert not torch.isnan(recall[1]).any() and recall[1, 1] == 1.0


def test_exact_pixel_counts_and_the_rankings_tie_break_on_a_constant_map():
    maps = torch.zeros(3, 4, 4)  # all tied: the selection is the tie-break's
    everything = torch.ones(3, 4, 4, dtype=torch.bool)
    fractions = [0.1, 0.3, 0.5, 0.9]  # 1.6 → 2, 4.8 → 5, 8, 14.4 → 14 of 16 pixels
    _, recall = precision_recall(maps, everything, fractions)
    assert (recall * 16).tolist() == [[2.0, 5.0, 8.0, 14.0]] * 3

    regions = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(2)) > 0.5
    indices = torch.tensor([11, 4, 7])
    precision, _ = precision_recall(maps, regions, fractions, indices=indices, seed=5)
    order = ranks(maps, indices, seed=5)[:, 0]  # what roar.perturb.ranking selects
    for column, k in enumerate([2, 5, 8, 14]):
        inside = ((order < k) & regions).flatten(1).sum(1)
        assert (precision[:, column] * k).round().long().tolist() == inside.tolist()

    alone, _ = precision_recall(maps[1:2], regions[1:2], fractions, indices=indices[1:2], seed=5)
    assert torch.equal(alone[0], precision[1]), "an image's result does not depend on its batch"


def test_chunking_does_not_change_the_result(monkeypatch):
    generator = torch.Generator().manual_seed(6)
    maps = (torch.rand(7, 8, 8, generator=generator) * 4).round()  # many ties
    regions = torch.rand(7, 8, 8, generator=generator) < 0.3
    whole = precision_recall(maps, regions)
    monkeypatch.setattr(evaluation, "_CHUNK_POSITIONS", 100)  # one map per chunk
    chunked = precision_recall(maps, regions)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_fractions_outside_zero_one_are_refused():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        precision_recall(torch.rand(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), [0.0, 0.5])


# --------------------------------------------------------------------------------------------- area


def test_the_area_is_sklearns_average_precision_on_a_full_grid():
    generator = torch.Generator().manual_seed(3)
    map_ = torch.randperm(64, generator=generator).float().reshape(1, 8, 8)  # no ties
    region = torch.rand(1, 8, 8, generator=generator) < 0.3
    grid = [k / 64 for k in range(1, 65)]
    area = pr_area(*precision_recall(map_, region, grid))
    expected = average_precision_score(region.ravel().numpy(), map_.ravel().numpy())
    assert area == pytest.approx(expected, abs=1e-12)
    assert 0.1 < area < 0.9


def test_a_perfect_map_has_area_one():
    region = torch.zeros(1, 16, 16, dtype=torch.bool)
    region[0, 4:12, 4:12] = True  # 64 of 256 pixels = 25%, a point of the default grid
    assert 0.25 in DEFAULT_FRACTIONS
    assert pr_area(*precision_recall(region.float(), region, DEFAULT_FRACTIONS)) == 1.0


def test_maps_with_an_empty_region_are_left_out_of_the_area():
    generator = torch.Generator().manual_seed(4)
    maps = torch.rand(3, 8, 8, generator=generator)
    regions = torch.rand(3, 8, 8, generator=generator) < 0.4
    regions[1] = False
    precision, recall = precision_recall(maps, regions)
    keep = torch.tensor([0, 2])
    assert pr_area(precision, recall) == pytest.approx(pr_area(precision[keep], recall[keep]), abs=1e-15)
    assert math.isnan(pr_area(precision[1:2], recall[1:2]))


def test_a_random_map_scores_the_regions_share_of_pixels():
    generator = torch.Generator().manual_seed(5)
    maps = torch.rand(16, 32, 32, generator=generator)
    regions = torch.zeros(16, 32, 32, dtype=torch.bool)
    regions[:, :, :8] = True  # 25% of the pixels
    area = pr_area(*precision_recall(maps, regions))
    # Over 16 × 1024 pixels the random area's spread is ~0.01: 0.05 is far beyond chance.
    assert abs(area - 0.25) < 0.05
