"""The shape every metric shares, and ``METRICS``, the registry that stages build their tables from.

A metric is a class with four declarations and one method:

* ``name``: its registered name, and the name of the value it returns (a table column);
* ``direction``: ``"higher"`` or ``"lower"``, which way is better. One word per metric keeps
  rankings and tables simple; a metric whose reading depends on a setting says in its docstring
  which setting the word refers to (a curve measure: the MoRF curve, see ``roar.metrics.curves``);
* ``needs``: what a stage must supply beyond images and labels, out of ``NEEDS``: the ``model``,
  attribution ``maps``, ground-truth object ``masks``, the method that made the maps (``explain``,
  to recompute them under a randomised model or for a perturbed input), or models trained again on ablated
  data (``retraining``). A stage checks them against what it has before it evaluates anything;
* ``config``: the pydantic class of its parameters (``MetricConfig``, none, by default), so that a
  metric is built like a method or a fill: ``METRICS.create("name", **params)``;
* ``evaluate_batch(**inputs) -> {name: values}``: values for a whole batch at once, one per image
  (leading dimension B). Inputs come as keywords from the vocabulary in ``INPUTS``; a metric names
  the ones it reads and swallows the rest with ``**_``, so a stage passes one set of keywords to
  every metric it evaluates, as fills take their ``context``. Per-image values keep an image's
  value independent of the batch it is in, and let a stage sum or average over any split.

The values are a dict, not a bare tensor, so that one pass may return companion values beside the
metric's own (a rank beside a hit, say) under names the metric documents; stages read ``name``.

Adding a metric is one file in ``roar/metrics/`` holding a ``Metric`` subclass decorated with
``@register``, and its import in ``roar/metrics/__init__.py``; ``tests/examples/metric_example.py`` is a
complete example. ``register`` checks the declarations, so a misspelt direction or need fails at
import, not in the middle of a stage.

ROAR and KAR accuracy (``needs`` ``retraining``) are not registered. Their value is the test
accuracy of a model trained once per (method, threshold, seed) on ablated data, which only the
retrain stage can afford; its trainer computes that accuracy, and an entry here whose
``evaluate_batch`` no stage calls would be a second definition to keep in step. ``retraining``
stays in ``NEEDS`` for the day those measures report through this registry.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import torch

from roar.core.registry import Registry
from roar.core.schema import Section

DIRECTIONS = ("higher", "lower")
NEEDS = ("model", "maps", "masks", "explain", "retraining")

# The keywords a stage may pass to ``evaluate_batch``; B images of C × H × W, K classes.
INPUTS = {
    "images": "float [B, C, H, W] in [0, 1], before normalisation (the model normalises)",
    "labels": "int64 [B], the true classes",
    "indices": "int64 [B], the images' rows in their split (seeds per-image randomness)",
    "maps": "float32 [B, H, W], attribution maps reduced over channels (needs 'maps')",
    "masks": "bool [B, H, W], ground-truth object masks, True on the object (needs 'masks')",
    "model": "the classifier in eval mode, taking images in [0, 1] (needs 'model')",
    "targets": "int64 [B], the classes the maps explain (the store's target: predicted or label)",
    "explain": "the method that made the maps, bound by the stage to the batch (roar.attribution.explainer): "
    "explain(model, images, targets) -> float32 [B, H, W], reduced over channels as the maps are, with the "
    "batch's context and a fixed generator (needs 'explain': randomisation, sensitivity)",
    "clean": "float32 [B, K], the model's softmax on the clean images (curve measures)",
    "perturbed": "float32 [B, K], the softmax on the images perturbed at one curve step (curve measures)",
}


class MetricConfig(Section):
    """Parameters every metric accepts (none); a metric with parameters extends it."""


class Metric:
    """Base of every metric: subclasses declare ``name``, ``direction`` and ``needs`` and implement
    ``evaluate_batch``; ``title`` is the human name tables and plots show (default: ``name``)."""

    name: ClassVar[str]
    direction: ClassVar[str]
    needs: ClassVar[frozenset[str]]
    title: ClassVar[str] = ""
    config: ClassVar[type[MetricConfig]] = MetricConfig

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and "title" not in cls.__dict__:
            cls.title = cls.name

    def __init__(self, **params: Any):
        self.params = self.config.model_validate(params)

    def evaluate_batch(self, **inputs: Any) -> dict[str, torch.Tensor]:
        """``{self.name: values [B]}`` (and any companion values) for one batch; see ``INPUTS``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({params})"


class MetricRegistry(Registry):
    """``Registry`` of metric classes, which can also hand back a class and copy itself.

    The class carries the declarations (direction, needs) a stage reads before it builds anything;
    ``copy`` lets a test register an extra metric without it reaching every later test.
    """

    def get(self, name: str) -> type[Metric]:
        self._check(name)
        return self._factories[name]

    def classes(self) -> list[type[Metric]]:
        """Every registered metric class, sorted by name (the order tables list them in)."""
        return [self.get(name) for name in self.names()]

    def copy(self) -> MetricRegistry:
        other = MetricRegistry(self.kind)
        for cls in self.classes():
            other.register(cls.name, cls.config)(cls)
        return other


METRICS: MetricRegistry = MetricRegistry("metric")

M = TypeVar("M", bound=type[Metric])


def check(cls: type[Metric]) -> None:
    """Raise ValueError unless ``cls`` declares a usable name, direction, needs and config."""
    where = f"metric {cls.__name__}"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{where}: name must be an identifier (it becomes a column), got {name!r}")
    if getattr(cls, "direction", None) not in DIRECTIONS:
        raise ValueError(f"{where}: direction must be one of {DIRECTIONS}, got {getattr(cls, 'direction', None)!r}")
    needs = getattr(cls, "needs", None)
    if not isinstance(needs, frozenset) or not needs <= set(NEEDS):
        raise ValueError(f"{where}: needs must be a frozenset out of {NEEDS}, got {needs!r}")
    if not (isinstance(cls.config, type) and issubclass(cls.config, MetricConfig)):
        raise ValueError(f"{where}: config must subclass MetricConfig, got {cls.config!r}")
    if cls.evaluate_batch is Metric.evaluate_batch:
        raise ValueError(f"{where}: evaluate_batch is not implemented")


def register(cls: M, into: MetricRegistry = METRICS) -> M:
    """Class decorator: ``@register`` on a ``Metric`` subclass; ``register(cls, into=copy)`` in tests."""
    check(cls)
    into.register(cls.name, cls.config)(cls)
    return cls
