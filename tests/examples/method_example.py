"""A new attribution method in one file: the absolute gradient, |∂ logit_c / ∂x|.

To add it to roar, save this as ``roar/attribution/abs_gradient.py`` and add ``abs_gradient`` to
the import line of ``roar/attribution/__init__.py``; ``attribution.methods: [abs_gradient]`` then
works in every config, and the contract tests run it.
"""

from __future__ import annotations

from roar.attribution.base import Attribution, EngineConfig
from roar.attribution.engine import input_gradients
from roar.attribution.registry import register


@register
class AbsGradient(Attribution):
    """|∂ logit_c / ∂x|: the gradient's magnitude, its sign dropped."""

    name = "abs_gradient"
    config = EngineConfig  # max_batch: the inputs per backward pass

    def attribute(self, model, images, targets, *, generator=None, context=None):
        return input_gradients(model, images, targets, max_batch=self.params.max_batch).abs()
