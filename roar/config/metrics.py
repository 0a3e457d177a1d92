"""The ``metrics`` section of ``roar metrics``: measures of the stored maps that need no retraining."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer

from roar.core.errors import RoarError
from roar.core.registry import closest
from roar.core.schema import Section
from roar.metrics import METRICS, CurveMeasure

KNOWN_ORDER = [["ground_truth"], ["oracle_blur", "oracle_dilate"], ["oracle_shuffle"], ["random"]]
"""Explanations whose quality is known by construction, best first; a tier's members tie."""


def evaluable() -> list[str]:
    """Registered metrics a stage can compute from maps alone: not the curve measures (``roar curves``)
    and not those that need retraining."""
    return [
        cls.name for cls in METRICS.classes() if not issubclass(cls, CurveMeasure) and "retraining" not in cls.needs
    ]


class MetricEntry(Section):
    """One metric to compute: its registered ``name`` and parameters (``{name: pointing_game, tolerance: 0}``)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_serializer
    def _short_form(self) -> str | dict[str, Any]:
        return self.name if not self.params else {"name": self.name, **self.params}


def _metric_entry(index: int, raw: Any) -> MetricEntry:
    if isinstance(raw, MetricEntry):
        return raw
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        raise ValueError(f"[{index}]: expected a metric name or a mapping with 'name'")
    name = str(raw["name"])
    if name not in evaluable():
        hint = closest(name, evaluable())
        raise ValueError(f"[{index}]: unknown metric '{name}'{hint}; known: {', '.join(evaluable())}")
    params = {k: v for k, v in raw.items() if k != "name"}
    try:
        METRICS.create(name, **params)
    except RoarError as exc:
        raise ValueError(f"[{index}] {exc}") from None
    return MetricEntry(name=name, params=params)


class MetricsConfig(Section):
    """``roar metrics``: localisation, randomisation, complexity and robustness of every stored method,
    and how well each metric recovers a known order of explanations."""

    metrics: list[MetricEntry] | None = Field(
        None, description="metrics (names or {name, parameters}); default: every one the dataset supports"
    )
    methods: list[str] | None = Field(None, description="store methods to evaluate; default: all in the store")
    split: Literal["train", "test"] = "test"
    max_images: int | None = Field(200, ge=2, description="a seeded random subset of the split; null: all")
    batch_size: int = Field(32, ge=1, description="images per call of a metric")
    known_order: list[list[str]] = Field(
        default_factory=lambda: [list(tier) for tier in KNOWN_ORDER],
        description="methods of known quality, best tier first (ties within a tier): the meta-evaluation's answer",
    )

    @field_validator("metrics", mode="before")
    @classmethod
    def _entries(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list):
            raise ValueError("expected a list of metric names or mappings")
        entries = [_metric_entry(i, raw) for i, raw in enumerate(value)]
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"each metric at most once, got {names}")
        return entries

    @field_validator("known_order")
    @classmethod
    def _tiers(cls, tiers: list[list[str]]) -> list[list[str]]:
        flat = [m for tier in tiers for m in tier]
        if len(tiers) < 2 or any(not tier for tier in tiers) or len(set(flat)) != len(flat):
            raise ValueError("at least two non-empty tiers, each method once")
        return tiers
