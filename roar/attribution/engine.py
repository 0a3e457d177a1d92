"""The batched gradient engine that every gradient-family method runs on.

``input_gradients`` takes any number of inputs (all interpolation steps of IG, all noisy copies
of SmoothGrad, for every image of a batch, flattened into one [M, C, H, W] tensor) and returns
∂ logit_target / ∂ input for each, in chunks of at most ``max_batch`` inputs: one forward and one
backward pass per chunk, never a Python loop per image or per step. Parameters are frozen while it
runs, so autograd computes no weight gradients (about a third of a backward pass saved), and
``rules`` can swap a layer type's backward (guided backprop's ReLU; later PatternAttribution).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from roar.device import autocast

DEFAULT_MAX_BATCH = 512


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter for the duration; restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def select(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The logit of each row's target class, [M]."""
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


def input_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    rules: Callable[[], contextlib.AbstractContextManager] | None = None,
    amp: bool = False,
    output: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """∂ output(model(x))[target] / ∂x for every row of ``inputs`` [M, ...], float32.

    ``output`` maps logits to the scores differentiated (default: the logits themselves; VoG's toy
    uses softmax). Rows are independent (the model is in eval mode), so summing the selected
    scores of a chunk and taking one backward pass gives every row's own gradient.
    """
    grads = torch.empty(inputs.shape, dtype=torch.float32, device=inputs.device)
    targets = targets.to(inputs.device)
    with frozen(model), rules() if rules is not None else contextlib.nullcontext():
        for start in range(0, len(inputs), max_batch):
            stop = min(start + max_batch, len(inputs))
            x = inputs[start:stop].detach().clone().requires_grad_(True)
            with torch.enable_grad(), autocast(inputs.device, amp):
                logits = model(x).float()
                scores = output(logits) if output is not None else logits
                (grad,) = torch.autograd.grad(select(scores, targets[start:stop]).sum(), x)
            grads[start:stop] = grad.float()
    return grads


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, max_batch: int = DEFAULT_MAX_BATCH, amp: bool = False
) -> torch.Tensor:
    """Predicted classes [B] in eval mode."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(images), max_batch):
            with autocast(images.device, amp):
                out.append(model(images[start : start + max_batch]).argmax(1))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=images.device)
    finally:
        model.train(was_training)
