"""The run configuration: ``RunConfig`` and a section per stage (see ``roar.config.run``)."""

from roar.config.curves import CurvesConfig
from roar.config.extract import AttributionConfig, MethodEntry
from roar.config.insecurity import HardnessConfig, InsecurityConfig
from roar.config.metrics import MetricEntry, MetricsConfig
from roar.config.patterns import PatternsConfig
from roar.config.report import ReportConfig
from roar.config.retrain import RetrainConfig
from roar.config.run import (
    RunConfig,
    apply_override,
    config_from_dict,
    dump_config,
    load_config,
    read_yaml,
    section_keys,
)
from roar.config.vog import VogConfig
from roar.perturb.fills import FillConfig
from roar.training.config import TrainingConfig

__all__ = [
    "AttributionConfig",
    "CurvesConfig",
    "FillConfig",
    "HardnessConfig",
    "InsecurityConfig",
    "MethodEntry",
    "MetricEntry",
    "MetricsConfig",
    "PatternsConfig",
    "ReportConfig",
    "RetrainConfig",
    "RunConfig",
    "TrainingConfig",
    "VogConfig",
    "apply_override",
    "config_from_dict",
    "dump_config",
    "load_config",
    "read_yaml",
    "section_keys",
]
