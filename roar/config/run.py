"""The run configuration: one typed schema for every stage, loaded from YAML plus overrides.

``load_config("configs/demo.yaml", ["training.epochs=3"])`` returns a validated ``RunConfig``.
Every problem (an unknown or misspelt key, a wrong type, an impossible value) is reported as a
``RoarError`` whose one line names the dotted key. Each stage's section lives in its own module
of this package (``extract``, ``retrain``, ``curves``, ``vog``, ``insecurity``, ``metrics``, ``report``;
``training`` in ``roar.training``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from roar.config.curves import CurvesConfig
from roar.config.extract import AttributionConfig
from roar.config.insecurity import InsecurityConfig
from roar.config.metrics import MetricsConfig
from roar.config.patterns import PatternsConfig
from roar.config.report import ReportConfig
from roar.config.retrain import RetrainConfig
from roar.config.vog import VogConfig
from roar.core.errors import RoarError
from roar.core.schema import DuplicateKeyError, Section, Seed, dump_yaml, format_validation_error, load_yaml, registered
from roar.data import DATASETS, DatasetConfig
from roar.models import MODELS, ModelConfig
from roar.training.config import TrainingConfig

DatasetSection = registered(DATASETS, DatasetConfig, default="shapes")
ModelSection = registered(MODELS, ModelConfig, default="resnet8")

RENAMED_SECTIONS = {"roar": "retrain", "lerf": "curves"}
"""Sections under their earlier names, still read (the ROAR seed's users write ``lerf``)."""


def rename_sections(data: dict) -> dict:
    """``data`` with sections under an earlier name moved to the current one."""
    data = dict(data)
    for old, new in RENAMED_SECTIONS.items():
        if old in data:
            if new in data:
                raise PydanticCustomError(
                    "renamed", "'{key}' is the old name of '{new}': give one of them", {"key": old, "new": new}
                )
            data[new] = data.pop(old)
    return data


class RunConfig(Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: Path | None = Field(None, description="where the run writes; default runs/<name>")
    seed: Seed = Field(0, description="seed of training, attribution noise, tie-breaks and subsets")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    dataset: DatasetSection = Field(default_factory=lambda: DATASETS.config_class("shapes")())
    model: ModelSection = Field(default_factory=lambda: MODELS.config_class("resnet8")())
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    attribution: AttributionConfig = Field(default_factory=AttributionConfig)
    patterns: PatternsConfig = Field(default_factory=PatternsConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    curves: CurvesConfig = Field(default_factory=CurvesConfig)
    vog: VogConfig = Field(default_factory=VogConfig)
    insecurity: InsecurityConfig = Field(default_factory=InsecurityConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="before")
    @classmethod
    def _current_section_names(cls, data: Any) -> Any:
        return rename_sections(data) if isinstance(data, dict) else data

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
    parts = key.strip().split(".")
    try:
        value = load_yaml(text) if text.strip() else ""
    except DuplicateKeyError as exc:
        raise RoarError(
            f"--set '{assignment}': duplicate key '{'.'.join([*parts, exc.key])}': give each key once"
        ) from None
    except yaml.YAMLError:
        value = text
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
    """The mapping a YAML config file holds (UTF-8 text; a key given twice in a mapping is an error)."""
    file = Path(path)
    if not file.is_file():
        raise RoarError(f"config file not found: {file}")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise RoarError(f"cannot read the config file {file}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RoarError(
            f"{file}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}): save it with UTF-8 encoding"
        ) from None
    try:
        data = load_yaml(text)
    except yaml.reader.ReaderError as exc:  # a control character: its position counts characters
        line = text[: exc.position].count("\n") + 1
        raise RoarError(
            f"{file}: not valid YAML at line {line}: character #x{exc.character:04x} is not allowed"
        ) from None
    except DuplicateKeyError as exc:
        raise RoarError(f"{file}: {exc.problem}: give each key once (YAML would silently keep only the last)") from None
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
        data = rename_sections(data)
    except PydanticCustomError as exc:
        raise RoarError(f"{source}: {exc.context['key']}: {exc.message()}") from None
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise RoarError(f"{source}: {format_validation_error(exc, data)}") from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML: every default spelt out, loadable again by ``load_config``."""
    return dump_yaml(cfg)


def section_keys(model: type[Section] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (for documentation and suggestions)."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann: Any = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            keys += section_keys(ann, prefix + name + ".")
    return keys
