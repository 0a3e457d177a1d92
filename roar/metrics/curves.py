"""Curve measures: what ``roar curves`` records at each step of a MoRF, LeRF or random-order curve.

The engine (``roar.perturb.curves.curve_sums``) runs the model on each step's perturbed images and
asks every measure for one value per image from ``labels``, ``clean`` and ``perturbed`` (softmax
outputs); it sums them over images, and the stage divides by the number of images. Here are the
three measures of the stage's tables, each against the *clean* prediction c of an image x:

* ``accuracy``: 1 where the perturbed image x̃ is classified as its label, else 0;
* ``probability``: p_c(x̃), the softmax probability of the clean prediction;
* ``relative_change``: |p_c(x) − p_c(x̃)| / p_c(x) × 100, the ROAR seed's LeRF measure (p_c(x)
  clamped at 1e-12, so a zero is no division by zero).

A measure's ``direction`` is the better way for its **MoRF** curve: removing the most relevant
positions first should hurt most, so accuracy and probability are better ``lower`` and the relative
change ``higher``. Under LeRF and for LeRF − MoRF the better way is the opposite, and the
random-order control is a baseline with no better way; ``direction_of`` answers per summary.

Each measure also summarises its curves (``areas``): the area under each order's curve by the
trapezoid rule over the fraction removed (not the step index, as steps need not be evenly spaced),
and LeRF − MoRF when a method has both orders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from roar.metrics.base import METRICS, Metric, MetricRegistry, register
from roar.perturb.curves import area

OPPOSITE = {"higher": "lower", "lower": "higher"}


class CurveMeasure(Metric):
    """A measure of the model at one step of a perturbation curve, one value per image.

    ``evaluate_batch`` returns exactly ``{name: values [B]}``: the stage writes one column per
    measure. ``axis`` labels the measure's plot panel (default: ``title``).
    """

    needs: ClassVar[frozenset[str]] = frozenset({"model", "maps"})
    axis: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "axis" not in cls.__dict__ and "title" in cls.__dict__:
            cls.axis = cls.title

    def areas(self, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> dict[str, float]:
        """``{order: area}`` for each ``order: (fractions, values)`` curve of one method, and
        ``lerf_minus_morf`` when both orders are there."""
        out = {order: area(fractions, values) for order, (fractions, values) in curves.items()}
        if "morf" in out and "lerf" in out:
            out["lerf_minus_morf"] = out["lerf"] - out["morf"]
        return out

    def direction_of(self, summary: str) -> str | None:
        """The better way for a summary of ``areas``: ``direction`` for MoRF, the opposite for LeRF
        and LeRF − MoRF, None for the random order (a baseline, not a score)."""
        if summary == "morf":
            return self.direction
        if summary in ("lerf", "lerf_minus_morf"):
            return OPPOSITE[self.direction]
        if summary == "random":
            return None
        raise ValueError(f"unknown curve summary {summary!r}")


def clean_prediction(clean: torch.Tensor) -> torch.Tensor:
    """c [B, 1], the class each clean image is predicted as: the class whose probability is followed."""
    return clean.argmax(1)[:, None]


@register
class Accuracy(CurveMeasure):
    """Share of perturbed images classified as their label; MoRF: lower is better."""

    name = "accuracy"
    direction = "lower"
    title = "Accuracy"
    axis = "accuracy"

    def evaluate_batch(self, *, labels: torch.Tensor, perturbed: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        return {self.name: (perturbed.argmax(1) == labels).float()}


@register
class Probability(CurveMeasure):
    """p_c(x̃), the softmax probability of the clean prediction; MoRF: lower is better."""

    name = "probability"
    direction = "lower"
    title = "Probability of the clean prediction"
    axis = "p(clean prediction)"

    def evaluate_batch(self, *, clean: torch.Tensor, perturbed: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        return {self.name: perturbed.gather(1, clean_prediction(clean))[:, 0]}


@register
class RelativeChange(CurveMeasure):
    """|p_c(x) − p_c(x̃)| / p_c(x) × 100; MoRF: higher is better."""

    name = "relative_change"
    direction = "higher"
    title = "Relative change (%)"
    axis = "relative change (%)"

    def evaluate_batch(self, *, clean: torch.Tensor, perturbed: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        c = clean_prediction(clean)
        p_clean = clean.gather(1, c)[:, 0]
        p = perturbed.gather(1, c)[:, 0]
        return {self.name: (p_clean - p).abs() / p_clean.clamp_min(1e-12) * 100}


def curve_measures(registry: MetricRegistry = METRICS) -> list[CurveMeasure]:
    """The registered curve measures, built with their default parameters, sorted by name."""
    return [cls() for cls in registry.classes() if issubclass(cls, CurveMeasure)]
