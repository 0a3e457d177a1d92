"""The ``patterns`` section of ``roar patterns``: the signal patterns of PatternNet, PatternAttribution and PGIG."""

from __future__ import annotations

from pydantic import Field

from roar.core.schema import Section


class PatternsConfig(Section):
    """``roar patterns`` (and ``roar extract`` on first use): per layer followed by a ReLU, the signal
    patterns of Kindermans et al. (2018), estimated from training images with the trained model."""

    samples: int | None = Field(
        None, ge=1, description="training images to estimate from (a seeded random subset); default: the whole split"
    )
    batch_size: int = Field(64, ge=1, description="images per estimation batch")
    checkpoint_every: int = Field(
        20, ge=1, description="batches between checkpoints of the running sums; a killed estimation resumes there"
    )
    num_workers: int = Field(2, ge=0, description="loader workers for datasets read from disk")
