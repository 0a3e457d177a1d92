"""The ``insecurity`` section of ``roar insecurity``: deliberative insecurity maps and their evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from roar.core.schema import Section

SCORES = ("cs", "entropy", "hp")
VARIANTS = ("gradient", "ig", "2ndg")


class HardnessConfig(Section):
    """The hardness predictor behind the ``hp`` score: a head on the classifier's features, cross-fitted."""

    folds: int = Field(
        5, ge=2, description="cross-fitting folds of the split: each image is scored by a predictor that never saw it"
    )
    hidden: int = Field(32, ge=1, description="channels of the predictor's 1x1 convolution")
    epochs: int = Field(60, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    max_images: int | None = Field(
        None, ge=10, description="a seeded subset of the split to fit on (features are held in memory); default: all"
    )


class InsecurityConfig(Section):
    """``roar insecurity``: where the network is torn between two classes (Wang & Vasconcelos, 2019)."""

    split: Literal["train", "test"] = "test"
    images: Literal["auto", "two_objects", "hard", "all"] = Field(
        "auto",
        description="which images get maps: those tagged two_objects (torn between two known classes), every "
        "tagged hard example, or all; auto: two_objects where the dataset tags them, else all",
    )
    max_images: int | None = Field(None, ge=1, description="a seeded subset of the chosen images; default: all")
    layer: str = Field(
        "auto", description="the feature layer (model.named_modules()); auto = the last convolutional stage"
    )
    top: int = Field(5, ge=2, le=20, description="top predicted classes that get a class map")
    per_location: int = Field(3, ge=2, description="classes per location whose pairs are ambiguities")
    scores: list[Literal["cs", "entropy", "hp"]] = Field(default_factory=lambda: list(SCORES))
    variants: list[Literal["gradient", "ig", "2ndg"]] = Field(default_factory=lambda: list(VARIANTS))
    ig_steps: int = Field(50, ge=2, description="integration steps of the IG variant (black reference)")
    fractions: list[float] | None = Field(
        None, description="top-r fractions at which maps are binarised for precision and recall; default: 26 values"
    )
    batch_size: int = Field(64, ge=1, description="images per chunk of work")
    max_batch: int | None = Field(None, ge=1, description="inputs per forward/backward pass; default per device")
    examples: int = Field(8, ge=0, description="images in the example grid")
    hardness: HardnessConfig = Field(default_factory=HardnessConfig)

    @field_validator("scores", "variants")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        if not values or len(set(values)) != len(values):
            raise ValueError(f"give each at least once and at most once, got {values}")
        return values

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, fractions: list[float] | None) -> list[float] | None:
        if fractions is None:
            return None
        if not fractions or any(not 0 < r <= 1 for r in fractions) or sorted(set(fractions)) != list(fractions):
            raise ValueError(f"fractions are strictly increasing values in (0, 1], got {fractions}")
        return fractions

    @model_validator(mode="after")
    def _per_location_fits(self) -> InsecurityConfig:
        if self.per_location > self.top:
            raise ValueError(f"per_location ({self.per_location}) cannot exceed top ({self.top})")
        return self
