"""The ``training`` section (and ``retrain.training``): how a classifier is trained."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from roar.core.schema import Section
from roar.training.recipes import apply_recipe


class OptimizerConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    nesterov: bool = True


class ScheduleConfig(Section):
    name: Literal["constant", "step", "cosine", "onecycle"] = "step"
    step_epochs: int = Field(10, ge=1, description="step: multiply the lr by gamma every this many epochs")
    gamma: float = Field(0.5, gt=0, le=1)
    warmup_fraction: float = Field(0.2, ge=0, lt=1, description="onecycle: share of steps spent warming up")


class AugmentConfig(Section):
    """Train-time augmentation, applied after any ablation and before normalisation."""

    crop_padding: int = Field(4, ge=0, description="random crop of the image padded by this many pixels (0: off)")
    flip: bool | Literal["alternating"] = Field(
        True,
        description="left-right flips: true (each image at random every epoch), false, or alternating (each image "
        "flipped on every other epoch, from a random first choice: every image is seen both ways within two epochs)",
    )


class SnapshotConfig(Section):
    """Copies of the weights kept during training, for VoG and other training-dynamics scores."""

    epochs: list[int] | Literal["all"] = Field(
        default_factory=list, description="epochs (1-based) after which to snapshot"
    )
    every_steps: int | None = Field(None, ge=1, description="also snapshot every this many optimiser steps")


class LookaheadConfig(Section):
    """Lookahead (Zhang et al., NeurIPS 2019): every ``every`` steps the slow weights move ``alpha`` of the
    way to the fast ones and the fast weights restart from them."""

    every: int = Field(5, ge=1)
    alpha: float = Field(0.5, gt=0, le=1)


class TrainingConfig(Section):
    """How a classifier is trained: ``training`` for the base model, ``retrain.training`` for retraining.

    ``recipe`` names a preset of ``roar.training.recipes.RECIPES`` (``fast``, ``seed``); keys given beside
    it override the preset's, so ``{recipe: fast, epochs: 5}`` is the fast recipe for five epochs.
    """

    recipe: str | None = Field(None, description="a named preset (fast, seed); other keys override its values")
    epochs: int = Field(
        30, ge=0, description="0: no training, the model as built (e.g. pretrained weights) is evaluated and saved"
    )
    batch_size: int = Field(256, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ema: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="decay per step of an exponential moving average of the weights, which "
        "is then evaluated and saved (null: off)",
    )
    lookahead: LookaheadConfig | None = Field(None, description="Lookahead on the weights (null: off)")
    bn_momentum: float | None = Field(
        None, gt=0, le=1, description="BatchNorm running-statistics momentum (PyTorch's convention; null: the model's)"
    )
    bn_lr_scale: float = Field(1.0, gt=0, description="learning-rate multiplier of BatchNorm weights and biases")
    whiten_init: bool = Field(
        False, description="initialise the first convolution with the whitening filters of training-image patches"
    )
    tta: Literal["none", "flip"] = Field(
        "none",
        description="test-time augmentation of the test accuracy: flip "
        "averages the logits of the image and its mirror image",
    )
    eval_every: int = Field(1, ge=0, description="test accuracy every this many epochs (0: only at the end)")
    snapshots: SnapshotConfig = Field(default_factory=SnapshotConfig)
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format (faster on CUDA and on the CPU)")
    num_workers: int = Field(4, ge=0, description="loader workers for datasets streamed from disk")

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        return apply_recipe(data)
