"""The shape every attribution method shares.

A method is built once from its parameters (``create("integrated_gradients", steps=50)``) and then
called on batches: ``method(model, images, targets) -> Tensor[B, C, H, W]`` (or ``[B, 1, H, W]``
for maps without channels, such as GradCAM), float32 and unreduced. Images are in [0, 1]; the
model normalises them itself (``roar.models.Classifier``).

Everything a method needs beyond the batch comes through keywords that the extraction stage
always passes and direct callers may omit:

* ``generator``: the random stream of this batch (noise, random baselines), so an interrupted
  extraction recomputes exactly the maps it would have written;
* ``context``: per-example data from the dataset (``indices``, ground-truth ``masks``) and shared
  data (``references``: training images for expected gradients; ``patterns``: the model's signal
  patterns for PatternNet, PatternAttribution and PGIG).

What a method needs from the context it declares in ``needs`` (a subset of ``NEEDS``), and the
extraction stage supplies exactly that: reference images are sampled only when some method needs
them, and a dataset without object masks is refused up front when some method needs masks. A
method's name is never what decides this, so a new or renamed method gets its data by saying so.

A method whose map is a deterministic function of the input, computed from input gradients, says
``smoothable = True``: a noise tunnel (``roar.attribution.noise``) may then average it over noisy
copies of the input. Such a method needs nothing from the context (the noisy copies have no masks
or dataset indices of their own).

Methods that share passes declare it with ``shared_key``: the extraction stage computes one
``shared`` result per key and hands it to every method with that key (gradient and grad×input
share one backward pass; SmoothGrad, SmoothGrad² and VarGrad of one base share their noisy
samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from roar.attribution.engine import DEFAULT_MAX_BATCH
from roar.core.schema import Section
from roar.perturb.reduce import reduce_map

# What a method may need beyond the batch, and where the extraction stage puts it.
NEEDS: dict[str, str] = {
    "masks": "the dataset's ground-truth object masks (context.masks)",
    "references": "a seeded sample of training images (context.references)",
    "patterns": "the model's signal patterns, estimated from training images by 'roar patterns' (context.patterns)",
}


class MethodConfig(Section):
    """Parameters every method accepts; each method extends it with its own."""


class EngineConfig(MethodConfig):
    """Parameters of methods that run the model: how many inputs go through it at once."""

    max_batch: int | None = Field(
        DEFAULT_MAX_BATCH, ge=1, description="inputs per forward/backward pass (memory budget); default per device"
    )


@dataclass
class Context:
    """What the dataset knows about the examples of a batch, and shared reference data."""

    indices: torch.Tensor | None = None  # int64 [B], positions in the split
    masks: torch.Tensor | None = None  # uint8 [B, H, W] ground-truth object masks, if any
    references: torch.Tensor | None = None  # float [R, C, H, W] training images in [0, 1]
    patterns: Any = None  # roar.attribution.patterns.Patterns of the model (PatternNet, PatternAttribution, PGIG)
    extra: dict[str, Any] = field(default_factory=dict)


class Attribution:
    """Base of every method. Subclasses set ``config`` and implement ``attribute``.

    ``requires_model`` is False for model-independent controls (sobel, ground_truth, random).
    ``needs`` names what the method reads from the ``Context`` (keys of ``NEEDS``); ``smoothable``
    says that a noise tunnel may wrap it (see the module docstring).
    ``passes`` is the number of forward+backward passes per image, for budgets and floors.
    """

    name: ClassVar[str]
    config: ClassVar[type[MethodConfig]] = MethodConfig
    requires_model: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset()
    smoothable: ClassVar[bool] = False

    def __init__(self, **params: Any):
        self.params = self.config.model_validate(params)

    @property
    def passes(self) -> int:
        return 1 if self.requires_model else 0

    def shared_key(self) -> tuple | None:
        """Methods returning equal keys are computed from one ``shared`` result; None: no sharing."""
        return None

    def compute_shared(self, model, images, targets, *, generator=None, context=None) -> Any:
        raise NotImplementedError

    def from_shared(self, shared: Any, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, generator, context
    ) -> torch.Tensor:
        if self.shared_key() is not None:
            return self.from_shared(
                self.compute_shared(model, images, targets, generator=generator, context=context), images
            )
        raise NotImplementedError

    def __call__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        context: Context | None = None,
    ) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"{self.name}: images must be [B, C, H, W], got {tuple(images.shape)}")
        targets = torch.as_tensor(targets, device=images.device).reshape(-1)
        if len(targets) != len(images):
            raise ValueError(f"{self.name}: {len(images)} images but {len(targets)} targets")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        out = self.attribute(model, images, targets, generator=generator, context=context or Context())
        return out.float()

    def __repr__(self) -> str:
        return f"{self.name}({self.params.model_dump()})"


def explainer(method: Attribution, reduction: str, seed: int, context: Context | None = None):
    """``explain(model, images, targets) -> float [B, H, W]``: the method's maps for one batch of
    dataset examples, reduced over channels by ``reduction`` as the store reduced them.

    The metrics that recompute maps (randomisation, sensitivity) call it with a randomised model,
    perturbed images or other targets. Everything else stays fixed: the context of the batch (its
    dataset indices and masks) and a fresh CPU generator seeded with ``seed`` at every call, so a
    stochastic method's own draws do not vary between the calls compared.
    """
    context = context or Context()

    def explain(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raw = method(model, images, targets, generator=torch.Generator().manual_seed(seed), context=context)
        return reduce_map(raw, reduction, raw.shape[1]).to(images.device)

    return explain
