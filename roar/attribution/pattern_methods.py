"""PatternNet and PatternAttribution (Kindermans et al., ICLR 2018) and Pattern-Guided Integrated
Gradients (Schwarzenberg & Castle, ICML 2020 WHI workshop).

* **pattern_net**: the gradient of the target logit with each unit's pattern a in place of its weight w
  (the signal direction, not the filter), ReLU gates of the forward pass kept: the estimated signal.
* **pattern_attribution**: the same with w ⊙ a₊ in place of w: how much each input contributes to the
  output through its signal, not through the filter's distractor suppression.
* **pgig**: integrated gradients from a zero baseline whose path gradients are PatternAttribution's:
  x ⊙ ∫₀¹ PA_grad(αx) dα, by the same quadrature as ``integrated_gradients``
  (https://arxiv.org/abs/2007.10685). On the paper's saturated toy model IG credits the distractor and
  PatternAttribution is zero on the plateau; PGIG does neither (``tests/test_patterns.py``).

The patterns come from the context (``context.patterns``, ``roar.attribution.patterns.Patterns``):
``roar extract`` estimates them once per trained model from the training images (``roar patterns``,
``<run>/patterns/patterns.h5``) when a configured method needs them. Patterns of another architecture
or other weights are refused. The units, and how residual adds are treated, are described in
``roar.attribution.pattern_graph``; the estimators in ``roar.attribution.patterns``.

None of the three is smoothable: a noise tunnel's noisy copies carry no context, and these need one.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from roar.attribution.base import Attribution, Context, EngineConfig
from roar.attribution.engine import input_gradients
from roar.attribution.integrated import Rule, baseline_for, path_gradients, quadrature
from roar.attribution.patterns import Patterns, pattern_model
from roar.attribution.registry import register
from roar.core.errors import RoarError

Estimator = Literal["linear", "two_component"]


def patterns_of(context: Context, who: str) -> Patterns:
    patterns = context.patterns
    if patterns is None:
        raise RoarError(
            f"{who} needs the model's signal patterns (context.patterns), estimated from training images by "
            "'roar patterns' (roar extract does it when a method needs them)"
        )
    if not isinstance(patterns, Patterns):
        raise RoarError(
            f"{who}: context.patterns must be roar.attribution.patterns.Patterns, got {type(patterns).__name__}"
        )
    return patterns


class PatternNetConfig(EngineConfig):
    estimator: Estimator = Field(
        "linear",
        description="pattern in place of each weight: linear a = cov(x, y)/var(y), or two_component a₊ "
        "(the positive regime's, as in the paper's experiments and iNNvestigate)",
    )


class PatternAttributionConfig(EngineConfig):
    estimator: Estimator = Field("two_component", description="pattern multiplied into each weight (a₊ by default)")


class PGIGConfig(PatternAttributionConfig):
    steps: int = Field(50, ge=1, le=10_000, description="path points α (each one PatternAttribution pass)")
    rule: Rule = Field("gausslegendre", description="quadrature over α, as integrated_gradients")
    baseline: Literal["black", "white", "mean"] | float = Field(
        "black", description="x′ of the path x′ + α(x − x′): black is the paper's zero input in [0, 1] space"
    )


class _PatternGradient(Attribution):
    """The gradient of the target logit through the model's pattern backward (``mode``: "net" puts each
    unit's pattern in place of its weight, "attribution" weight ⊙ pattern): [B, C, H, W]."""

    mode: str
    needs = frozenset({"patterns"})

    def attribute(self, model, images, targets, *, generator, context) -> torch.Tensor:
        p = self.params
        net = pattern_model(model, patterns_of(context, self.name), self.mode, p.estimator, self.name)
        return input_gradients(net, images, targets, max_batch=p.max_batch)


@register
class PatternNet(_PatternGradient):
    """∂ logit_target / ∂x with each unit's pattern in place of its weight: [B, C, H, W]."""

    name = "pattern_net"
    config = PatternNetConfig
    mode = "net"


@register
class PatternAttribution(_PatternGradient):
    """∂ logit_target / ∂x with each unit's weight ⊙ pattern in place of its weight: [B, C, H, W]."""

    name = "pattern_attribution"
    config = PatternAttributionConfig
    mode = "attribution"


@register
class PatternGuidedIG(Attribution):
    """(x − x′) ⊙ Σ_s w_s PA_grad(x′ + α_s (x − x′)); with the default black x′ = 0: x ⊙ ∫ PA_grad(αx) dα."""

    name = "pgig"
    config = PGIGConfig
    needs = frozenset({"patterns"})

    @property
    def passes(self) -> int:
        return self.params.steps

    def attribute(self, model, images, targets, *, generator, context) -> torch.Tensor:
        p = self.params
        net = pattern_model(model, patterns_of(context, self.name), "attribution", p.estimator, self.name)
        baseline = baseline_for(p.baseline, images, model)
        alphas, weights = quadrature(p.rule, p.steps)
        return (images - baseline) * path_gradients(net, images, baseline, alphas, weights, targets, p.max_batch)
