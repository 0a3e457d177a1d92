"""Measures of attribution maps and models, by name: ``METRICS``.

``base`` holds the shape every metric shares (``Metric``: ``name``, ``direction``, ``needs``,
``evaluate_batch``) and the registry; each other module registers its metrics on import, which is
why each is imported here: a new metric is a new module and one import line below.

* ``curves``: accuracy, probability of the clean prediction and its relative change along the
  MoRF, LeRF and random-order curves of ``roar curves``, and their areas.
* ``localisation``: whether a map points at the ground-truth object: pointing game, relevance mass
  and rank accuracy, top-k intersection, AUC and the energy-based pointing game.
* ``complexity``: how concentrated a map is: sparseness (Gini), complexity (entropy) and effective
  complexity.
* ``randomisation``: sanity checks (Adebayo et al.): similarity of the map to the maps of the model
  randomised layer by layer, cascading or independently, and to the map of a random other class.
* ``robustness``: max- and avg-sensitivity (Yeh et al.): the map's relative change under small
  input noise.
"""

from roar.metrics import complexity, curves, localisation, randomisation, robustness
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
    "complexity",
    "curve_measures",
    "curves",
    "localisation",
    "randomisation",
    "register",
    "robustness",
]
