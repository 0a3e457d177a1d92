"""The ``retrain`` section of ``roar retrain``: the ROAR/KAR sweep (remove or keep the top pixels, retrain)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from roar.core.schema import Section
from roar.perturb.fills import FillConfig
from roar.training.config import TrainingConfig


class RetrainConfig(Section):
    """``roar retrain`` (alias ``roar evaluate``): the ROAR/KAR retraining sweep."""

    methods: list[str] | None = Field(None, description="store methods to evaluate; default: all in the store")
    thresholds: list[float] = Field(default_factory=lambda: [10, 30, 50, 70, 90], description="percent of pixels")
    seeds: int = Field(3, ge=1, description="retraining seeds per (method, threshold)")
    granularity: Literal["pixel", "element"] = "pixel"
    fill: FillConfig = Field(
        default_factory=lambda: {"name": "mean"}, description="what replaces removed pixels: a fill and its parameters"
    )
    training: TrainingConfig | Literal["base"] = Field(
        default_factory=lambda: TrainingConfig.model_validate({"recipe": "fast"}),
        description="the retraining recipe: a training section, the fast recipe unless it names another "
        "(recipe: seed) or none (recipe: null); 'base' retrains with the base model's own training section",
    )
    streaming: bool | None = Field(
        None, description="read maps from disk with loader workers; default: in memory when it fits"
    )
    num_workers: int = Field(2, ge=0)
    jobs: int = Field(
        1,
        ge=1,
        description="processes sharing the sweep on this machine, each with cores/jobs threads "
        "(2 on a 2-core CPU: small retrainings use two cores better side by side than one after another)",
    )
    leakage: bool | list[float] = Field(
        False,
        description="also train on the binary removal mask alone (chance = 1/#classes): true at every "
        "threshold, or a list of thresholds",
    )

    @field_validator("training", mode="before")
    @classmethod
    def _fast_by_default(cls, training: Any) -> Any:
        """A retraining section that names no recipe starts from the fast one."""
        if isinstance(training, dict) and "recipe" not in training:
            return {"recipe": "fast", **training}
        return training

    def leakage_removed(self, modes: list[str]) -> list[float]:
        """Percentages of pixels removed by the masks the leakage diagnostic trains on. KAR keeping the
        top t% removes exactly the complement of ROAR's top (100 - t)%, and a network learns the same
        from a mask as from its complement, so each distinct removed share is trained once."""
        wanted = self.thresholds if self.leakage is True else (self.leakage or [])
        removed = {float(t) for t in wanted if "roar" in modes} | {100.0 - t for t in wanted if "kar" in modes}
        return sorted(removed)

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, thresholds: list[float]) -> list[float]:
        return _percentages(thresholds, "thresholds")

    @field_validator("leakage")
    @classmethod
    def _leakage_thresholds(cls, leakage: bool | list[float]) -> bool | list[float]:
        return _percentages(leakage, "leakage thresholds") if isinstance(leakage, list) else leakage

    @field_validator("fill")
    @classmethod
    def _whole_pixels(cls, fill: Any) -> Any:
        if fill.patches:
            raise ValueError(f"fill {fill.name} replaces whole patches, which ROAR/KAR do not rank; use curves for it")
        return fill


def _percentages(values: list[float], what: str) -> list[float]:
    bad = [t for t in values if not 0 < t < 100]
    if bad or not values:
        raise ValueError(f"{what} are percentages strictly between 0 and 100, got {bad or values}")
    return values
