"""The ``report`` section of ``roar report``: what the one page of a run shows."""

from __future__ import annotations

from pydantic import Field

from roar.core.schema import Section


class ReportConfig(Section):
    images_per_class: int = Field(
        1, ge=1, le=10, description="test images per class in the maps section (the first of each class, fixed)"
    )
    classes: int = Field(10, ge=1, description="at most this many classes in the maps section")
    methods: list[str] | None = Field(None, description="methods of the maps section (null: every stored one)")
    fraction: float = Field(
        0.3, gt=0, lt=1, description="share of the pixels removed in the maps section's ROAR and ROAD pictures"
    )
