"""Averages of the weights along training: an exponential moving average (EMA) and Lookahead.

Both smooth the noise of high-learning-rate SGD, which is what lets a short, aggressive schedule
end at a good point (the CIFAR-10 speed records use them; their effect here is measured in
docs/benchmarks.md). Each keeps its own copy of the weights; ``state_dict`` and
``load_state_dict`` put that copy in the checkpoint, so a resumed run averages exactly as an
uninterrupted one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _floats(module: nn.Module) -> list[torch.Tensor]:
    """The floating-point parameters and buffers (BatchNorm statistics) of ``module``, in state order."""
    return [t for t in module.state_dict(keep_vars=True).values() if t.is_floating_point()]


class WeightEMA:
    """``average ← d·average + (1 − d)·weights`` after every optimiser step, over parameters and
    BatchNorm statistics, with the usual warm-up ``d = min(decay, (1 + t) / (10 + t))`` so that the
    first steps are not dominated by the random initialisation. ``model`` is the averaged network
    (a copy of the trained one) to evaluate and save; integer buffers are copied."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.model = copy.deepcopy(net)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(_floats(self.model), _floats(net), 1 - d)
        for name, buf in net.named_buffers():
            if not buf.is_floating_point():
                self.model.get_buffer(name).copy_(buf)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = state["steps"]


class Lookahead:
    """Every ``every`` steps: ``slow ← slow + alpha·(fast − slow)``, then ``fast ← slow`` (parameters only;
    BatchNorm statistics stay the fast network's). At the end of training the fast weights are set to
    the slow ones by ``finish``."""

    def __init__(self, net: nn.Module, every: int, alpha: float):
        self.every, self.alpha = every, alpha
        self.steps = 0
        self.slow = [p.detach().clone() for p in net.parameters()]

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.finish(net)

    @torch.no_grad()
    def finish(self, net: nn.Module) -> None:
        fast = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(self.slow, fast, self.alpha)
        torch._foreach_copy_(fast, self.slow)

    def state_dict(self) -> dict:
        return {"slow": [t.clone() for t in self.slow], "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for t, saved in zip(self.slow, state["slow"]):
            t.copy_(saved)
        self.steps = state["steps"]


class Averages:
    """The weight averages a recipe keeps (EMA, Lookahead), updated after every optimiser step."""

    def __init__(self, model: torch.nn.Module, cfg) -> None:
        """``cfg``: a training section (its ``ema`` and ``lookahead`` keys)."""
        self.ema = WeightEMA(model, cfg.ema) if cfg.ema else None
        self.lookahead = Lookahead(model, cfg.lookahead.every, cfg.lookahead.alpha) if cfg.lookahead else None

    def update(self, model: torch.nn.Module) -> None:
        if self.lookahead is not None:
            self.lookahead.update(model)
        if self.ema is not None:
            self.ema.update(model)

    def finish(self, model: torch.nn.Module) -> None:
        """End of training: the fast weights take the Lookahead's last step (if one is pending)."""
        if self.lookahead is not None and self.lookahead.steps % self.lookahead.every:
            self.lookahead.finish(model)

    def evaluated(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network whose accuracy is reported and which is saved: the EMA if kept, else ``model``."""
        return self.ema.model if self.ema is not None else model

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in (("ema", self.ema), ("lookahead", self.lookahead)) if part}

    def load_state_dict(self, state: dict) -> None:
        for name, part in (("ema", self.ema), ("lookahead", self.lookahead)):
            if part is not None:
                part.load_state_dict(state[name])
