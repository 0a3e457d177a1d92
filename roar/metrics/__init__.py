"""Measures of attribution maps and models, by name: ``METRICS``.

``base`` holds the shape every metric shares (``Metric``: ``name``, ``direction``, ``needs``,
``evaluate_batch``) and the registry; each other module registers its metrics on import, which is
why each is imported here: a new metric is a new module and one import line below.

* ``curves``: accuracy, probability of the clean prediction and its relative change along the
  MoRF, LeRF and random-order curves of ``roar curves``, and their areas.
"""

from roar.metrics import curves
from roar.metrics.base import DIRECTIONS, INPUTS, METRICS, NEEDS, Metric, MetricConfig, MetricRegistry, register
from roar.metrics.curves import CurveMeasure, curve_measures

__all__ = [
    "DIRECTIONS",
    "INPUTS",
    "METRICS",
    "NEEDS",
    "CurveMeasure",
    "Metric",
    "MetricConfig",
    "MetricRegistry",
    "curve_measures",
    "curves",
    "register",
]
