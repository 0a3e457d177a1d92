"""Plain gradients (Simonyan et al. 2014) and gradient × input (Shrikumar et al. 2016).

Both come from the same single backward pass: requested together, they share it. Both are
functions of the input alone, so a noise tunnel may wrap either (``smoothable``).
"""

from __future__ import annotations

from roar.attribution.base import Attribution, EngineConfig
from roar.attribution.engine import input_gradients
from roar.attribution.registry import register


class _GradientFamily(Attribution):
    config = EngineConfig
    smoothable = True

    def shared_key(self):
        return ("gradient",)

    def compute_shared(self, model, images, targets, *, generator=None, context=None):
        return input_gradients(model, images, targets, max_batch=self.params.max_batch)


@register
class Gradient(_GradientFamily):
    """∂ logit_c / ∂x."""

    name = "gradient"

    def from_shared(self, shared, images):
        return shared


@register
class GradXInput(_GradientFamily):
    """x ⊙ ∂ logit_c / ∂x."""

    name = "grad_x_input"

    def from_shared(self, shared, images):
        return images * shared
