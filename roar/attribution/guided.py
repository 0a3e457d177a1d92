"""Guided backpropagation (Springenberg et al., "Striving for Simplicity", ICLR 2015 workshop).

The gradient of the target logit with respect to the input, except that every ReLU passes a
gradient back only where its forward input was positive *and* the incoming gradient is
positive.

Why not module backward hooks: the usual recipe hooks ``nn.ReLU`` modules, which misses
functional ``F.relu``/``torch.relu`` calls altogether, and ``register_full_backward_hook`` breaks
on torchvision's BasicBlock, whose single ``nn.ReLU(inplace=True)`` is called twice and whose
second call rectifies ``out += identity`` in place. Here the rule is an autograd Function
(``GuidedReLU``) that the ReLU entry points are routed to for the duration of a context:
``nn.ReLU.forward`` looks ``F.relu`` up at call time, so patching the functional entry points
covers modules, functional calls and tensor methods alike, in place or not, reused or not.

``backward_rule`` is the general mechanism (swap a layer type's backward inside a context and put
everything back afterwards, also when an exception escapes); ``guided_relu`` is its ReLU instance,
and the gradient engine accepts it as ``rules=guided_relu``. The patches are process-wide while
the context is open: do not run unrelated models in other threads meanwhile. Code that bound
``relu`` to a local name before the context opened (``from torch.nn.functional import relu``)
is not reached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import has_torch_function_unary

from roar.attribution.base import Attribution, EngineConfig
from roar.attribution.engine import input_gradients
from roar.attribution.registry import register

# (owner, attribute, make): within the context ``owner.attribute`` becomes ``make(original)``.
Patch = tuple[object, str, Callable[[Callable], Callable]]

_MISSING = object()


@contextlib.contextmanager
def backward_rule(*patches: Patch) -> Iterator[None]:
    """Replace entry points (``owner.attribute``) by ``make(original)`` for the duration.

    Typically ``make`` returns a function that routes the call through a custom
    ``torch.autograd.Function`` with the same forward and a different backward, and falls back to
    ``original`` when no gradient is being recorded. Everything is restored on exit, in reverse
    order, also after an exception; attributes that an owner only inherited (``torch.Tensor.relu``
    lives on its C base class) are removed again rather than copied onto the owner.
    """
    saved: list[tuple[object, str, object]] = []
    try:
        for owner, attribute, make in patches:
            original = getattr(owner, attribute)
            saved.append((owner, attribute, vars(owner).get(attribute, _MISSING)))
            setattr(owner, attribute, make(original))
        yield
    finally:
        for owner, attribute, own in reversed(saved):
            if own is _MISSING:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, own)


class GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward passes ``grad`` only where ``input > 0`` and ``grad > 0``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = x.clamp_(min=0)
        else:
            out = x.clamp(min=0)
        # out > 0 exactly where the input was > 0, also after an in-place update.
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0), None


def _records(x: object) -> bool:
    """True when autograd records an op on ``x`` (otherwise the original, faster op runs)."""
    return (
        isinstance(x, torch.Tensor) and torch.is_grad_enabled() and x.requires_grad and not has_torch_function_unary(x)
    )


def _guided(inplace: bool) -> Callable[[Callable], Callable]:
    """``make`` for a one-argument entry point (``torch.relu(x)``, ``x.relu_()``)."""

    def make(original: Callable) -> Callable:
        def relu(x, *args, **kwargs):
            if args or kwargs or not _records(x):
                return original(x, *args, **kwargs)
            return GuidedReLU.apply(x, inplace)

        return relu

    return make


def _guided_functional(original: Callable) -> Callable:
    """``make`` for ``F.relu(input, inplace=False)``, which ``nn.ReLU.forward`` calls."""

    def relu(input, inplace: bool = False):  # noqa: A002 - F.relu's own signature
        if not _records(input):
            return original(input, inplace=inplace)
        return GuidedReLU.apply(input, bool(inplace))

    return relu


def guided_relu() -> contextlib.AbstractContextManager:
    """Within the context every ReLU backpropagates guided-backprop style.

    Covers ``nn.ReLU`` (in place or not, reused or not), ``F.relu``/``F.relu_``,
    ``torch.relu``/``torch.relu_`` and ``Tensor.relu``/``Tensor.relu_``. Usable as
    ``input_gradients(..., rules=guided_relu)``.
    """
    return backward_rule(
        (F, "relu", _guided_functional),
        (F, "relu_", _guided(inplace=True)),
        (torch, "relu", _guided(inplace=False)),
        (torch, "relu_", _guided(inplace=True)),
        (torch.Tensor, "relu", _guided(inplace=False)),
        (torch.Tensor, "relu_", _guided(inplace=True)),
    )


@register
class GuidedBackprop(Attribution):
    """∂ logit_target / ∂ input with guided ReLU backward passes: [B, C, H, W]."""

    name = "guided_backprop"
    config = EngineConfig
    smoothable = True  # the ROAR paper's GB-SG, GB-SG², GB-VarGrad

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, generator, context
    ) -> torch.Tensor:
        return input_gradients(model, images, targets, max_batch=self.params.max_batch, rules=guided_relu)
