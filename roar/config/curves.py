"""The ``curves`` section of ``roar curves``: perturbation curves of the trained model, no retraining."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from roar.core.schema import Section
from roar.perturb.fills import FillConfig

DEFAULT_FRACTIONS = [round(0.1 * i, 1) for i in range(11)]


class CurvesConfig(Section):
    """``roar curves`` (alias ``roar lerf``): perturbation curves without retraining (MoRF, LeRF, random
    order; pixels or patches; any fill, ROAD's included)."""

    methods: list[str] | None = Field(None, description="store methods to evaluate; default: all in the store")
    split: Literal["train", "test"] = "test"
    orders: list[Literal["morf", "lerf", "random"]] = Field(default_factory=lambda: ["morf", "lerf", "random"])
    granularity: Literal["pixel", "patch"] = "pixel"
    patch_size: int = Field(9, ge=1, description="patch granularity: side of the square patches")
    steps: list[float] | int = Field(
        default_factory=lambda: list(DEFAULT_FRACTIONS),
        description="fractions removed at each step, or (patch granularity) a number of patch steps 0..n",
    )
    fill: FillConfig = Field(
        default_factory=lambda: {"name": "mean"}, description="mean, zero, blur, road or patch_mean, with parameters"
    )
    max_images: int | None = Field(None, ge=1, description="a seeded random subset of the split; default: all")
    batch_size: int = Field(256, ge=1, description="images per forward pass")
    amp: bool = Field(False, description="bf16 autocast on CUDA")
    folder: str = Field(
        "curves",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="the run's folder for the results: several protocols side by side (curves_road, degradation)",
    )

    @field_validator("steps")
    @classmethod
    def _fractions(cls, steps: list[float] | int) -> list[float] | int:
        if isinstance(steps, int):
            if steps < 1:
                raise ValueError(f"a number of patch steps must be >= 1, got {steps}")
            return steps
        bad = [f for f in steps if not 0 <= f <= 1]
        if bad or not steps:
            raise ValueError(f"steps are fractions in [0, 1], got {bad or steps}")
        if sorted(steps) != list(steps) or len(set(steps)) != len(steps):
            raise ValueError(f"steps must be strictly increasing, got {steps}")
        return steps

    @model_validator(mode="after")
    def _patch_steps_need_patches(self) -> CurvesConfig:
        if isinstance(self.steps, int) and self.granularity != "patch":
            raise ValueError("a number of steps counts patches: set granularity: patch, or give fractions")
        if self.fill.patches and self.granularity != "patch":
            raise ValueError(f"fill {self.fill.name} replaces whole patches: set granularity: patch")
        return self
