"""The run configuration: one typed schema for every stage, loaded from YAML plus overrides.

``load_config("configs/demo.yaml", ["training.epochs=3"])`` returns a validated ``RunConfig``.
Every problem (an unknown or misspelt key, a wrong type, an impossible value) is reported as a
``RoarError`` whose one line names the dotted key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from roar.data import DATASETS
from roar.errors import RoarError
from roar.models import MODELS
from roar.registry import closest
from roar.schema import Section, format_validation_error

DatasetSection = Annotated[Union[tuple(DATASETS.configs())], Field(discriminator="name")]  # noqa: UP007
ModelSection = Annotated[Union[tuple(MODELS.configs())], Field(discriminator="name")]  # noqa: UP007


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
    """How a classifier is trained: ``training`` for the base model, ``roar.training`` for retraining.

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
        from roar.training.recipes import apply_recipe

        return apply_recipe(data)


DEFAULT_METHODS = [
    "gradient",
    "grad_x_input",
    "integrated_gradients",
    "guided_backprop",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "gradcam",
    "random",
    "sobel",
]


class MethodEntry(Section):
    """One map to extract: ``name`` in the store, the ``method`` computing it, its parameters.

    In YAML an entry is a method name (``vargrad``), or a mapping with ``name`` and the method's
    parameters (``{name: integrated_gradients, steps: 32}``); ``method`` renames
    (``{name: ig_white, method: integrated_gradients, baseline: white}``); a dotted ``method`` is
    a plug-in function called with ``kwargs`` (``{name: mine, method: pkg.mod.fn, kwargs: {...}}``).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    method: str
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_plugin(self) -> bool:
        return "." in self.method


def _method_entry(index: int, raw: Any) -> MethodEntry:
    from roar.attribution import METHODS, create

    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        raise ValueError(f"[{index}]: expected a method name or a mapping with 'name'")
    params = {k: v for k, v in raw.items() if k not in ("name", "method")}
    method = str(raw.get("method", raw["name"]))
    if "." in method:
        unknown = set(params) - {"kwargs"}
        if unknown:
            raise ValueError(
                f"[{index}] {raw['name']}: a plug-in takes only 'kwargs', not {', '.join(sorted(unknown))}"
            )
    else:
        if method not in METHODS:
            hint = closest(method, METHODS.names())
            raise ValueError(f"[{index}]: unknown attribution method '{method}'{hint}")
        try:
            create(method, **params)
        except RoarError as exc:
            raise ValueError(f"[{index}] {exc}") from None
    return MethodEntry(name=str(raw["name"]), method=method, params=params)


class AttributionConfig(Section):
    """``roar extract``: which maps to compute for which splits, and how to store them."""

    methods: list[Any] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    splits: list[Literal["train", "test"]] | dict[Literal["train", "test"], list[str] | Literal["all"]] = Field(
        default_factory=lambda: ["train", "test"],
        description="splits to extract every method for, or a mapping split -> the method names to extract "
        "for it ('all': every method), e.g. {test: all, train: [gradient, random]} when only the curves "
        "(test split) need every method and ROAR/KAR (both splits) only some",
    )
    target: Literal["predicted", "label"] = Field("predicted", description="class whose logit is attributed")
    reduction: Literal["sum_squares", "sum_abs", "max_abs", "none"] = "sum_squares"
    batch_size: int = Field(128, ge=1, description="images per extraction batch")
    max_batch: int | None = Field(
        None, ge=1, description="inputs per forward/backward pass (memory budget); default 64 on CPU, 1024 on GPU"
    )
    references: int = Field(256, ge=1, description="training images drawn as expected-gradients baselines")
    compression: Literal["lzf", "gzip", "none"] = "lzf"
    amp: bool = Field(False, description="bf16 autocast on CUDA while attributing")
    num_workers: int = Field(2, ge=0, description="loader workers for datasets read from disk")

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, methods: list[Any]) -> list[Any]:
        entries = [_method_entry(i, raw) for i, raw in enumerate(methods)]
        names = [e.name for e in entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"method names must be unique; repeated: {', '.join(duplicates)}")
        return methods

    @model_validator(mode="after")
    def _split_methods_exist(self) -> AttributionConfig:
        if isinstance(self.splits, dict):
            names = [e.name for e in self.entries()]
            for split, chosen in self.splits.items():
                unknown = [m for m in (names if chosen == "all" else chosen) if m not in names]
                if unknown:
                    raise PydanticCustomError(
                        "unknown_name",
                        "{unknown} not among the methods{hint}; the methods are {names}",
                        {
                            "key": f"splits.{split}",
                            "unknown": ", ".join(unknown),
                            "hint": closest(unknown[0], names),
                            "names": ", ".join(names),
                        },
                    )
        return self

    def entries(self, split: str | None = None) -> list[MethodEntry]:
        """The method entries, all of them or those extracted for ``split``."""
        entries = [_method_entry(i, raw) for i, raw in enumerate(self.methods)]
        chosen = self.splits.get(split, []) if isinstance(self.splits, dict) and split else "all"
        return entries if chosen == "all" else [e for e in entries if e.name in chosen]

    def split_names(self) -> list[str]:
        return list(self.splits)


class RoarConfig(Section):
    """``roar evaluate``: the ROAR/KAR retraining sweep."""

    methods: list[str] | None = Field(None, description="store methods to evaluate; default: all in the store")
    thresholds: list[float] = Field(default_factory=lambda: [10, 30, 50, 70, 90], description="percent of pixels")
    seeds: int = Field(3, ge=1, description="retraining seeds per (method, threshold)")
    granularity: Literal["pixel", "element"] = "pixel"
    fill: dict[str, Any] = Field(default_factory=lambda: {"name": "mean"}, description="fill and its parameters")
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
    def _percentages(cls, thresholds: list[float]) -> list[float]:
        bad = [t for t in thresholds if not 0 < t < 100]
        if bad or not thresholds:
            raise ValueError(f"thresholds are percentages strictly between 0 and 100, got {bad or thresholds}")
        return thresholds

    @field_validator("leakage")
    @classmethod
    def _leakage_percentages(cls, leakage: bool | list[float]) -> bool | list[float]:
        if isinstance(leakage, list):
            bad = [t for t in leakage if not 0 < t < 100]
            if bad or not leakage:
                raise ValueError(f"leakage thresholds are percentages strictly between 0 and 100, got {bad or leakage}")
        return leakage

    @field_validator("fill")
    @classmethod
    def _known_fill(cls, fill: dict[str, Any]) -> dict[str, Any]:
        return _check_fill(fill)


def _check_fill(fill: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    from roar.evaluation.fills import FILLS

    known = [*FILLS.names(), *extra]
    name = fill.get("name")
    if name not in known:
        raise ValueError(f"unknown fill '{name}'{closest(str(name), known)}; known: {', '.join(known)}")
    return fill


DEFAULT_FRACTIONS = [round(0.1 * i, 1) for i in range(11)]


class LerfConfig(Section):
    """``roar lerf``: perturbation curves without retraining (MoRF/LeRF, patch degradation, ROAD)."""

    methods: list[str] | None = Field(None, description="store methods to evaluate; default: all in the store")
    split: Literal["train", "test"] = "test"
    orders: list[Literal["morf", "lerf", "random"]] = Field(default_factory=lambda: ["morf", "lerf", "random"])
    granularity: Literal["pixel", "patch"] = "pixel"
    patch_size: int = Field(9, ge=1, description="patch granularity: side of the square patches")
    steps: list[float] | int = Field(
        default_factory=lambda: list(DEFAULT_FRACTIONS),
        description="fractions removed at each step, or (patch granularity) a number of patch steps 0..n",
    )
    fill: dict[str, Any] = Field(
        default_factory=lambda: {"name": "mean"}, description="mean, zero, blur, road or patch_mean, with parameters"
    )
    max_images: int | None = Field(None, ge=1, description="a seeded random subset of the split; default: all")
    batch_size: int = Field(256, ge=1, description="images per forward pass")
    amp: bool = Field(False, description="bf16 autocast on CUDA")

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

    @field_validator("fill")
    @classmethod
    def _known_fill(cls, fill: dict[str, Any]) -> dict[str, Any]:
        return _check_fill(fill, ("patch_mean",))

    @model_validator(mode="after")
    def _patch_steps_need_patches(self) -> LerfConfig:
        if isinstance(self.steps, int) and self.granularity != "patch":
            raise ValueError("a number of steps counts patches: set granularity: patch, or give fractions")
        if self.fill.get("name") == "patch_mean" and self.granularity != "patch":
            raise ValueError("fill patch_mean replaces whole patches: set granularity: patch")
        return self


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


class RunConfig(Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: Path | None = Field(None, description="where the run writes; default runs/<name>")
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    dataset: DatasetSection = Field(default_factory=lambda: DATASETS.config_class("shapes")())
    model: ModelSection = Field(default_factory=lambda: MODELS.config_class("resnet8")())
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    attribution: AttributionConfig = Field(default_factory=AttributionConfig)
    roar: RoarConfig = Field(default_factory=RoarConfig)
    lerf: LerfConfig = Field(default_factory=LerfConfig)
    vog: VogConfig = Field(default_factory=VogConfig)

    @model_validator(mode="before")
    @classmethod
    def _resolve_component_names(cls, data: Any) -> Any:
        """A section without ``name`` is the default component; an unknown name gets a hint."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for section, registry, default in (("dataset", DATASETS, "shapes"), ("model", MODELS, "resnet8")):
            value = data.get(section)
            if isinstance(value, dict):
                value = data[section] = {"name": default, **value}
                if value["name"] not in registry:
                    raise PydanticCustomError(
                        "unknown_name",
                        "unknown {kind} '{name}'{hint}; known: {known}",
                        {
                            "key": f"{section}.name",
                            "kind": registry.kind,
                            "name": str(value["name"]),
                            "hint": closest(str(value["name"]), registry.names()),
                            "known": ", ".join(registry.names()),
                        },
                    )
        return data

    @model_validator(mode="after")
    def _default_output_dir(self) -> RunConfig:
        if self.output_dir is None:
            self.output_dir = Path("runs") / self.name
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


# ---------------------------------------------------------------- loading


def apply_override(data: dict, assignment: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (``3``, ``[1, 2]``, ``null``)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise RoarError(f"--set '{assignment}': expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise RoarError(f"--set '{assignment}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    file = Path(path)
    if not file.is_file():
        raise RoarError(f"config file not found: {file}")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RoarError(f"{file}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RoarError(f"{file}: the top level must be a mapping of keys to values")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validated config from a YAML file (or the defaults) and ``dotted.key=value`` overrides."""
    raw = read_yaml(path) if path is not None else {}
    return config_from_dict(raw, overrides, source=str(path) if path else "config")


def config_from_dict(raw: dict, overrides=(), source: str = "config") -> RunConfig:
    data = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise RoarError(f"{source}: {format_validation_error(exc, data)}") from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML: every default spelt out, loadable again by ``load_config``."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def section_keys(model: type[Section] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (for documentation and suggestions)."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann: Any = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            keys += section_keys(ann, prefix + name + ".")
    return keys
