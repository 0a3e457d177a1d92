"""The ``vog`` section of ``roar vog``: Variance of Gradients and its peer difficulty scores."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from roar.core.schema import Section


class VogConfig(Section):
    """``roar vog``: Variance of Gradients over the training snapshots, and peer difficulty scores."""

    splits: list[Literal["train", "test"]] = Field(default_factory=lambda: ["train", "test"])
    stages: dict[str, list[int]] | None = Field(
        None,
        description="snapshot positions (0-based, in training order) of each stage; default: early, middle "
        "and late thirds; 'complete' (every snapshot) is always added",
    )
    batch_size: int = Field(256, ge=1, description="images per gradient batch")
    max_batch: int | None = Field(None, ge=1, description="inputs per backward pass; default 64 CPU, 1024 GPU")
    compression: Literal["lzf", "gzip", "none"] = Field(
        "none", description="of the gradient store; gradients are noise-like and barely compress (lzf saves <1%)"
    )
    grid_k: int = Field(8, ge=1, description="lowest- and highest-VoG images shown per class")
    grid_classes: int = Field(20, ge=0, description="classes (the first ones) that get an image grid")
    peers: bool = Field(True, description="also EL2N, forgetting events and data-map confidence/variability")
    el2n_snapshot: int | None = Field(
        None,
        description="snapshot position (0-based, negative from the end) of EL2N and GraNd; default: the last "
        "snapshot of the early stage",
    )
    grand: bool = Field(False, description="also GraNd, the per-example norm of the loss gradient over the weights")
