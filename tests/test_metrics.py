"""Metrics: declarations of every registered metric, the curve measures and their areas by hand,
batch invariance, and the worked example registered into a copy of the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from examples.metric_example import TopInMask
from helpers import full_batch, rows
from torch import nn

from roar.metrics import DIRECTIONS, METRICS, NEEDS, CurveMeasure, Metric, curve_measures, register
from roar.perturb.curves import curve_sums
from roar.perturb.fills import build_fill

# --------------------------------------------------------------------------------------------- registry


@pytest.fixture
def metrics():
    """A copy of ``METRICS`` holding the worked example too; ``METRICS`` itself never sees it."""
    registry = METRICS.copy()
    register(TopInMask, into=registry)
    return registry


def test_the_curve_measures_are_registered_in_the_order_of_the_tables():
    assert [m.name for m in curve_measures()] == ["accuracy", "probability", "relative_change"]


@pytest.mark.parametrize("name", METRICS.names())
def test_every_registered_metric_declares_a_valid_direction_and_needs(name):
    cls = METRICS.get(name)
    assert cls.name == name and issubclass(cls, Metric)
    assert cls.direction in DIRECTIONS
    assert isinstance(cls.needs, frozenset) and cls.needs and cls.needs <= set(NEEDS)
    assert cls.title, "tables and plots show the title"
    assert cls.evaluate_batch is not Metric.evaluate_batch
    METRICS.create(name)  # buildable with its default parameters


def test_curve_measure_directions_refer_to_morf_and_flip_for_lerf():
    by_name = {m.name: m for m in curve_measures()}
    assert {n: m.direction for n, m in by_name.items()} == {
        "accuracy": "lower",
        "probability": "lower",
        "relative_change": "higher",
    }
    accuracy = by_name["accuracy"]
    assert accuracy.direction_of("morf") == "lower"
    assert accuracy.direction_of("lerf") == accuracy.direction_of("lerf_minus_morf") == "higher"
    assert accuracy.direction_of("random") is None
    with pytest.raises(ValueError, match="unknown curve summary"):
        accuracy.direction_of("area")


def test_register_checks_the_declarations(metrics):
    def metric(**declared):
        return type("Bad", (Metric,), {"evaluate_batch": lambda self, **_: {}, **declared})

    good = {"name": "fine", "direction": "higher", "needs": frozenset({"maps"})}
    with pytest.raises(ValueError, match="direction"):
        register(metric(**{**good, "direction": "up"}), into=metrics)
    with pytest.raises(ValueError, match="needs"):
        register(metric(**{**good, "needs": frozenset({"labels"})}), into=metrics)
    with pytest.raises(ValueError, match="needs"):
        register(metric(**{**good, "needs": ["maps"]}), into=metrics)
    with pytest.raises(ValueError, match="name"):
        register(metric(**{**good, "name": "top-5"}), into=metrics)
    with pytest.raises(ValueError, match="not implemented"):
        register(type("Lazy", (Metric,), good), into=metrics)
    with pytest.raises(ValueError, match="registered twice"):
        register(TopInMask, into=metrics)
    register(metric(**good), into=metrics)
    assert "fine" in metrics and "fine" not in METRICS


def test_registering_into_a_copy_does_not_reach_the_registry(metrics):
    assert "top_in_mask" in metrics and "top_in_mask" not in METRICS
    assert set(metrics.names()) == {*METRICS.names(), "top_in_mask"}
    assert [m.name for m in curve_measures(metrics)] == [m.name for m in curve_measures()]


# --------------------------------------------------------------------------------------------- by hand


def test_curve_measures_on_hand_made_probabilities():
    clean = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])  # clean predictions 1, 0, 0 (ties: first)
    perturbed = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.25, 0.75]])
    labels = torch.tensor([1, 0, 1])
    values = {}
    for m in curve_measures():
        values.update(m.evaluate_batch(labels=labels, clean=clean, perturbed=perturbed))
    assert values["accuracy"].tolist() == [0.0, 1.0, 1.0]
    assert values["probability"].tolist() == pytest.approx([0.4, 0.9, 0.25])
    assert values["relative_change"].tolist() == pytest.approx([50.0, 50.0, 50.0])


class TwoClass(nn.Module):
    """logits = (ln 3, ln 2 · w·x) on 1×2×2 images: p_1 = 2^s / (3 + 2^s) with s = w·x, by hand."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.tensor([2.0, 1.0, 1.0, 0.0]))

    def forward(self, x):
        s = (x.flatten(1) * self.w).sum(1)
        return torch.stack([torch.full_like(s, math.log(3)), math.log(2) * s], 1)


def p1(s: float) -> float:
    return 2**s / (3 + 2**s)


def test_curve_sums_give_the_hand_computed_measures_of_a_two_class_model():
    """Two all-ones images (clean s = 4: class 1, p = 16/19), a zero fill, steps 0, 50%, 100%.
    Image 0 (label 1) ranks its pixels 0, 1, 2, 3; image 1 (label 0) the reverse. MoRF at 50% keeps
    s = 1 for image 0 (pixels 2, 3) and s = 3 for image 1 (pixels 0, 1); LeRF the other way round."""
    model = TwoClass()
    images = torch.ones(2, 1, 2, 2)
    labels = torch.tensor([1, 0])
    maps = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]).view(2, 2, 2)
    fill = build_fill("zero")
    p_clean = p1(4)

    def expected(s_per_image):
        """Per step, the mean over both images of (accuracy, probability, relative change)."""
        out = {"accuracy": [], "probability": [], "relative_change": []}
        for s_step in s_per_image:
            p = [p1(s) for s in s_step]
            predicted = [int(q > 0.5) for q in p]
            out["accuracy"].append(np.mean([c == y for c, y in zip(predicted, labels.tolist())]))
            out["probability"].append(np.mean(p))
            out["relative_change"].append(np.mean([abs(p_clean - q) / p_clean * 100 for q in p]))
        return out

    by_order = {"morf": [(4, 4), (1, 3), (0, 0)], "lerf": [(4, 4), (3, 1), (0, 0)]}
    for order, s_per_image in by_order.items():
        sums = curve_sums(
            model, images, labels, torch.arange(2), maps, order, [0, 0.5, 1.0], fill, measures=curve_measures(), seed=0
        )
        means = sums.means()
        assert list(means) == ["accuracy", "probability", "relative_change"] and sums.images == 2
        for name, values in expected(s_per_image).items():
            assert means[name] == pytest.approx(values, rel=1e-6, abs=1e-6), (order, name)
    # The numbers themselves, for the record: image 0 under MoRF at 50% has p = 2/5, class 0.
    assert expected([(1, 3)])["probability"] == pytest.approx([(2 / 5 + 8 / 11) / 2])
    assert expected([(1, 3)])["relative_change"] == pytest.approx([(52.5 + (1 - 8 / 11 * 19 / 16) * 100) / 2])
    assert expected([(0, 0)])["relative_change"] == pytest.approx([70.3125])


def test_curve_sums_refuses_a_measure_that_does_not_return_one_value_per_image():
    class Total(CurveMeasure):
        name = "total"
        direction = "lower"

        def evaluate_batch(self, *, perturbed, **_):
            return {self.name: perturbed.sum()}

    images = torch.ones(2, 1, 2, 2)
    with pytest.raises(ValueError, match="one value per image"):
        curve_sums(
            TwoClass(), images, torch.tensor([1, 0]), torch.arange(2), None, "random", [0, 1.0], build_fill("zero"),
            measures=[Total()], seed=0,
        )  # fmt: skip


def test_areas_are_trapezoids_over_the_fraction_and_lerf_minus_morf():
    fractions = [0.0, 0.05, 0.2, 0.6, 1.0]  # uneven steps: the index would give another area
    morf = [0.9, 0.7, 0.4, 0.2, 0.1]
    lerf = [0.9, 0.9, 0.85, 0.6, 0.1]
    for measure in curve_measures():
        a = measure.areas({"morf": (fractions, morf), "lerf": (fractions, lerf), "random": (fractions, lerf)})
        assert a["morf"] == float(np.trapezoid(morf, fractions))
        assert a["lerf"] == a["random"] == float(np.trapezoid(lerf, fractions))
        assert a["lerf_minus_morf"] == a["lerf"] - a["morf"]
        assert a["morf"] != pytest.approx(float(np.trapezoid(morf)) / (len(morf) - 1))
        assert "lerf_minus_morf" not in measure.areas({"morf": (fractions, morf)})


# --------------------------------------------------------------------------------------------- the example


def test_the_worked_example_gives_an_image_the_same_value_in_any_batch(metrics):
    metric = metrics.create("top_in_mask")
    inputs = full_batch()
    whole = metric.evaluate_batch(**inputs)["top_in_mask"]
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(metric.evaluate_batch(**rows(inputs, permutation))["top_in_mask"], whole[permutation])
    for i in range(6):
        assert torch.equal(metric.evaluate_batch(**rows(inputs, slice(i, i + 1)))["top_in_mask"], whole[i : i + 1])


def test_the_worked_example_gives_the_share_of_top_pixels_on_the_object(metrics):
    metric = metrics.create("top_in_mask", fraction=0.25)  # 4 of 16 pixels
    assert metric.needs == {"maps", "masks"} and metric.direction == "higher"
    relevance = torch.arange(16, 0, -1, dtype=torch.float32).view(4, 4)  # top 4: the first row
    maps = torch.stack([relevance, relevance, relevance.flip(0), torch.zeros(4, 4)])
    masks = torch.zeros(4, 4, 4, dtype=torch.bool)
    masks[0, 0, :2] = True  # two of the first row's four pixels
    masks[1, :2] = True  # the first two rows: all four
    masks[2, 0] = True  # the first row, but this map's top is the last row
    masks[3] = True  # everything: a flat map's tie-broken top is inside whatever it is
    values = metric.evaluate_batch(maps=maps, masks=masks, indices=torch.arange(4), labels=torch.zeros(4))
    assert values["top_in_mask"].tolist() == [0.5, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="fraction"):
        metrics.create("top_in_mask", fraction=0)
