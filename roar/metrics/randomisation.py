"""Randomisation sanity checks: does a method's map change when the model it explains is destroyed?

Adebayo et al. ("Sanity checks for saliency maps", NeurIPS 2018) re-initialise a trained model's
layers and recompute the maps: a map that explains the model must change with it, a map that does
not (an edge detector) stays the same. Sixt et al. ("When explanations lie", ICML 2020) ask the same
of the class: the map for another class should differ from the map for the explained one. Every
metric here is a *similarity* to the map the stage gives, so lower is better:

* ``model_randomisation``: cascading randomisation, from the top layer down; the value is the mean
  similarity over the steps (step k: the last k layers re-initialised);
* ``independent_randomisation``: one layer re-initialised at a time, the others trained;
* ``random_logit``: the map for a random other class, drawn per image from its dataset index.

What is re-initialised. A *layer* is a module holding parameters or buffers of its own (not only
through children) that defines ``reset_parameters``: Conv, Linear, BatchNorm, LayerNorm... A
container's tensors belong to its children, which are layers themselves; listing it too would
reset them twice. ``reset_parameters`` is the layer's own default initialisation, the untrained
state the check compares with (BatchNorm's is γ = 1, β = 0 and fresh running statistics: not random,
but it removes what training put there, as in Quantus). "Top" is the last layer in registration
order (``named_modules``), which is the forward order of sequential models and of torchvision's
ResNets. A model prepared for attribution (``prepare_model``) has its BatchNorms folded into the
convolutions, so there a convolution and its BatchNorm are one step.

Each layer is re-initialised from the CPU generator seeded by ``layer_seed(seed, name)``, a hash of
the metric's ``seed`` and the layer's name (in a forked RNG state: the global streams are untouched),
on a contiguous CPU copy of the layer. A layer thus gets the same random weights on every device and
memory format, in both orders, whatever else is randomised, and layers of one shape get different
weights. Quantus instead seeds every layer with ``seed + 1``; seeding with the bare seed would also
hand back a model's own initial weights whenever it was built right after ``torch.manual_seed`` with
that seed (``roar train`` seeds with the run's seed, 0 by default), and trained weights stay close
to their initialisation: the "randomised" layer would be nearly the trained one.

Similarities, per image, after taking absolute values (``absolute``; Adebayo reports both, Quantus's
MPRT default is ``True``; every reduction a store offers already gives maps ≥ 0, so it only matters
for signed maps passed directly) and dividing each map by its maximum absolute value (``normalise``; Quantus's
``normalise_by_max``, but per map, where Quantus divides a whole batch by one maximum):

* ``spearman``: Spearman's rank correlation (average ranks for ties, as scipy's ``spearmanr``);
* ``ssim``: scikit-image's ``structural_similarity`` (7 × 7 uniform window, K1 = 0.01, K2 = 0.03,
  sample covariance, the mean over the windows that fit in the map), batched in torch, with the data
  range of the two maps together (Quantus's ``ssim``); a window of the map's smaller side (made odd)
  on maps smaller than 7 × 7;
* ``hog``: Pearson's correlation of the maps' HOG features (scikit-image's ``hog``, 9 orientations,
  3 × 3-cell blocks, L2-Hys, cells of 8 pixels or of a third of the smaller side on small maps),
  computed per image on the CPU by scikit-image.

``similarities`` says which of them a metric computes (all three by default; the headline
``similarity`` must be among them): HOG, image by image, costs about as much as a gradient pass of
a small model, so a run that reads only Spearman's can leave it out.

A correlation is undefined when a map is constant (a flat control map, a dead model's zeros): it is
1 here when both maps are constant (nothing can have changed order) and 0 when only one is (no
association); likewise the SSIM of two equal constant maps is 1. Values are therefore always finite.

The stored maps are compared with maps recomputed by ``explain``, the method that made them as the
stage binds it (``roar.attribution.explainer``): reduced over channels as the store reduced them,
with the batch's context (dataset indices, masks) and a fixed generator, so only the model or the
target changes between the maps compared. Stored maps are float16 quotients of their maximum
(``roar.store.format``), so even an unchanged map is similar up to that precision.

``barely_changes`` is the verdict a stage draws from ``model_randomisation_last``: the method's maps
barely change when the whole model is randomised, so they do not explain the model.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from roar.core.errors import RoarError
from roar.core.sorting import twice_average_ranks
from roar.metrics.base import Metric, MetricConfig, register
from roar.perturb.fills import noise_seed

SIMILARITIES = ("spearman", "ssim", "hog")
ORDERS = ("cascading", "independent")
BARELY_CHANGES = 0.5
"""Mean Spearman correlation, after the whole model is randomised, above which a method's maps are
said to barely change. A convention, not the paper's (Adebayo et al. show curves, not a cut-off):
model-independent maps (edge detectors, masks) stay at 1, and a map that follows the weights loses
its rank order (the gradient of the tests' linear model: |ρ| < 0.5 per image). Positive values
short of 1 remain for maps of real models, whose structure partly comes from the image; more than
half of the rank order surviving the loss of every trained weight says that the map follows the
image rather than the model."""

SSIM_WINDOW, SSIM_K1, SSIM_K2 = 7, 0.01, 0.03  # scikit-image's structural_similarity defaults
HOG_ORIENTATIONS, HOG_CELL, HOG_BLOCK = 9, 8, 3  # scikit-image's hog defaults


# ---------------------------------------------------------------------------------------------- randomised models


def layers_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's re-initialisable layers (see the module docstring), bottom first: (name, module)."""
    return [
        (name or "model", module)
        for name, module in model.named_modules()
        if callable(getattr(module, "reset_parameters", None)) and _own_tensors(module)
    ]


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers a module holds itself, not through its children."""
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def layer_seed(seed: int, name: str) -> int:
    """The seed of a layer's re-initialisation: a 63-bit hash of the metric's seed and the layer's name."""
    return noise_seed(seed, zlib.crc32(name.encode()))


def reinitialise(module: nn.Module, seed: int) -> None:
    """Reset ``module``'s own tensors in place with its ``reset_parameters`` under ``seed``.

    The reset runs on a contiguous CPU copy from the CPU generator, so the new weights do not depend
    on the device or memory format of the model, and the global random state is left as it was.
    """
    fresh = copy.deepcopy(module).to("cpu", memory_format=torch.contiguous_format)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        fresh.reset_parameters()
    with torch.no_grad():
        for target, source in zip(_own_tensors(module), _own_tensors(fresh)):
            target.copy_(source)


def randomised(
    model: nn.Module, order: str = "cascading", seed: int = 0, layers: int | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """(layer name, randomised copy) per step, top layer first; ``model`` itself is never changed.

    ``cascading``: step k has the top k layers re-initialised; ``independent``: step k has only the
    k-th layer from the top re-initialised. ``layers`` caps the number of steps. One copy is made and
    changed between steps (cascading: one more layer; independent: the previous layer restored), so
    use each step's model before asking for the next.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown randomisation order {order!r}; known: {', '.join(ORDERS)}")
    copied = copy.deepcopy(model)
    chosen = layers_of(copied)[::-1][:layers]
    if not chosen:
        raise RoarError(f"{type(model).__name__} has no layer to randomise (no module with reset_parameters)")
    for name, module in chosen:
        saved = [t.clone() for t in _own_tensors(module)] if order == "independent" else []
        reinitialise(module, layer_seed(seed, name))
        yield name, copied
        with torch.no_grad():
            for target, original in zip(_own_tensors(module), saved):
                target.copy_(original)


# ---------------------------------------------------------------------------------------------- similarities


def _precise(x: torch.Tensor) -> torch.Tensor:
    """float64 where the device has it (MPS does not)."""
    return x.to(torch.float32 if x.device.type == "mps" else torch.float64)


def prepare(maps: torch.Tensor, absolute: bool, normalise: bool) -> torch.Tensor:
    """[B, H, W] maps as compared: absolute values if asked, then divided by their max |value|
    (an all-zero map stays zero)."""
    maps = _precise(maps)
    if absolute:
        maps = maps.abs()
    if normalise:
        top = maps.abs().flatten(1).amax(1).view(-1, 1, 1)
        maps = maps / torch.where(top > 0, top, torch.ones_like(top))
    return maps


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson's correlation of each row pair of [B, N]: 1 if both rows are constant, 0 if one is."""
    a, b = _precise(a), _precise(b)
    ca, cb = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (ca * cb).sum(1) / ((ca * ca).sum(1) * (cb * cb).sum(1)).sqrt()
    flat_a, flat_b = a.amax(1) == a.amin(1), b.amax(1) == b.amin(1)
    r = torch.where(flat_a | flat_b, (flat_a & flat_b).to(r.dtype), r)
    return r.clamp(-1, 1)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each row of [B, N], ties given their average rank (scipy's ``rankdata``)."""
    return _precise(twice_average_ranks(x.flatten(1))) / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation per image of [B, ...] maps: Pearson's of the average ranks."""
    return pearson(average_ranks(a), average_ranks(b))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW) -> torch.Tensor:
    """Mean structural similarity per image of [B, H, W] maps, as scikit-image's default.

    skimage filters with a uniform window and averages over the positions whose window lies inside
    the map, which is an unpadded average pool. The data range is that of the two maps together; two
    equal constant maps (range 0, where the formula is 0/0) have similarity 1.
    """
    a, b = _precise(a)[:, None], _precise(b)[:, None]
    size = min(window, *a.shape[-2:])
    size -= 1 - size % 2
    if size < 3:
        raise RoarError(f"SSIM needs maps of at least 3 × 3 pixels, got {tuple(a.shape[-2:])}")

    def pool(x):
        return F.avg_pool2d(x, size, stride=1)

    n = size * size
    mean_a, mean_b = pool(a), pool(b)
    cov = n / (n - 1)  # the sample covariance, skimage's use_sample_covariance=True
    var_a = cov * (pool(a * a) - mean_a * mean_a)
    var_b = cov * (pool(b * b) - mean_b * mean_b)
    var_ab = cov * (pool(a * b) - mean_a * mean_b)
    both = torch.cat([a.flatten(1), b.flatten(1)], 1)
    data_range = (both.amax(1) - both.amin(1)).view(-1, 1, 1, 1)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    top = (2 * mean_a * mean_b + c1) * (2 * var_ab + c2)
    bottom = (mean_a * mean_a + mean_b * mean_b + c1) * (var_a + var_b + c2)
    flat = data_range == 0  # both maps the same constant: 0/0 everywhere
    values = torch.where(flat, 1.0, top / torch.where(flat, 1.0, bottom))
    return values.flatten(1).mean(1)


def hog_features(image: np.ndarray) -> np.ndarray:
    """scikit-image's HOG feature vector of one 2-D map, with cells shrunk to fit small maps."""
    from skimage.feature import hog

    side = min(image.shape)
    if side < HOG_BLOCK:
        raise RoarError(f"HOG needs maps of at least {HOG_BLOCK} × {HOG_BLOCK} pixels, got {image.shape}")
    cell = max(1, min(HOG_CELL, side // HOG_BLOCK))
    return hog(
        image,
        orientations=HOG_ORIENTATIONS,
        pixels_per_cell=(cell, cell),
        cells_per_block=(HOG_BLOCK, HOG_BLOCK),
        block_norm="L2-Hys",
        feature_vector=True,
    )


def _hog_batch(maps: torch.Tensor) -> torch.Tensor:
    """float64 [B, F]: the HOG features of each [H, W] map of a batch (on the CPU)."""
    return torch.from_numpy(np.stack([hog_features(x.numpy()) for x in maps.detach().double().cpu()]))


def hog_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson's correlation of the HOG features of each pair of [B, H, W] maps (per image, on the CPU)."""
    return pearson(_hog_batch(a), _hog_batch(b)).to(a.device)


class Comparison:
    """The similarities of one batch of prepared [B, H, W] maps to any number of others.

    What depends on the original maps alone (their ranks, their HOG features) is computed once,
    not at every randomisation step.
    """

    def __init__(self, original: torch.Tensor, which: Sequence[str] = SIMILARITIES):
        unknown = sorted(set(which) - set(SIMILARITIES))
        if unknown:
            raise ValueError(f"unknown similarities {unknown}; known: {', '.join(SIMILARITIES)}")
        self.original, self.which = original, tuple(which)
        self._ranks = average_ranks(original) if "spearman" in which else None
        self._hog = _hog_batch(original) if "hog" in which else None

    def to(self, other: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{similarity: [B]}`` between the original maps and ``other``, for each chosen similarity."""
        out = {}
        if "spearman" in self.which:
            out["spearman"] = pearson(self._ranks, average_ranks(other))
        if "ssim" in self.which:
            out["ssim"] = ssim(self.original, other)
        if "hog" in self.which:
            out["hog"] = pearson(self._hog, _hog_batch(other)).to(other.device)
        return out


def similarities(original: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{similarity: [B]}`` for every one of ``SIMILARITIES``, between prepared [B, H, W] maps."""
    return Comparison(original).to(other)


def barely_changes(similarity: torch.Tensor | Sequence[float] | float, threshold: float = BARELY_CHANGES) -> bool:
    """True when the mean similarity (Spearman, after full cascading randomisation: the
    ``model_randomisation_last`` values) is above ``threshold`` (see ``BARELY_CHANGES``)."""
    return float(torch.as_tensor(similarity, dtype=torch.float64).mean()) > threshold


# ---------------------------------------------------------------------------------------------- metrics


class SimilarityConfig(MetricConfig):
    similarity: Literal["spearman", "ssim", "hog"] = Field("spearman", description="the similarity of the value")
    similarities: tuple[Literal["spearman", "ssim", "hog"], ...] = Field(
        SIMILARITIES, min_length=1, description="the similarities computed (the others are companions)"
    )
    absolute: bool = Field(True, description="compare |map| (every store reduction is already >= 0)")
    normalise: bool = Field(True, description="divide each map by its maximum absolute value before comparing")
    seed: int = Field(0, ge=0, description="seed of the re-initialisation")

    @model_validator(mode="after")
    def _headline_computed(self):
        if self.similarity not in self.similarities:
            raise ValueError(f"similarity '{self.similarity}' must be one of similarities {list(self.similarities)}")
        return self


class RandomisationConfig(SimilarityConfig):
    layers: int | None = Field(None, ge=1, description="at most this many steps, from the top layer; null: all layers")


class RandomLogitConfig(SimilarityConfig):
    similarity: Literal["spearman", "ssim", "hog"] = Field("ssim", description="the similarity of the value")
    absolute: bool = Field(False, description="compare |map| (every store reduction is already >= 0)")
    seed: int = Field(0, ge=0, description="seed of the other class, with the image's dataset index")


def _named(name: str, headline: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The headline similarity under ``name``, the others as ``name_<similarity>`` companions."""
    return {name if s == headline else f"{name}_{s}": v.float() for s, v in values.items()}


Explain = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``explain(model, images, targets) -> [B, H, W]``: the method that made the maps, bound by the
stage to the batch (``roar.attribution.explainer``; see ``roar.metrics.base.INPUTS``)."""


class _Randomisation(Metric):
    """Similarity of the map to the maps of a model randomised layer by layer; ``order`` says how."""

    direction = "lower"
    needs = frozenset({"model", "maps", "explain"})
    config = RandomisationConfig
    order: ClassVar[str]

    def evaluate_batch(
        self, *, model: nn.Module, maps: torch.Tensor, explain: Explain, images: torch.Tensor, targets, **_: Any
    ) -> dict[str, torch.Tensor]:
        p = self.params
        comparison = Comparison(prepare(maps, p.absolute, p.normalise), p.similarities)
        steps: dict[str, dict[str, torch.Tensor]] = {}
        for layer, randomised_model in randomised(model, self.order, p.seed, p.layers):
            steps[layer] = comparison.to(prepare(explain(randomised_model, images, targets), p.absolute, p.normalise))
        means = {s: torch.stack([step[s] for step in steps.values()]).mean(0) for s in p.similarities}
        out = _named(self.name, p.similarity, means)
        out.update({f"{self.name}@{layer}": step[p.similarity].float() for layer, step in steps.items()})
        if self.order == "cascading":
            out[f"{self.name}_last"] = out[f"{self.name}@{next(reversed(steps))}"]
        return out


@register
class ModelRandomisation(_Randomisation):
    """Mean similarity of the map to the maps of the model randomised cascading from the top
    (Adebayo et al.'s cascading randomisation; Quantus's ``MPRT`` with ``return_average_correlation``).

    Companions: the other similarities' means (``model_randomisation_ssim``, ``_hog`` by default),
    the headline similarity per step (``model_randomisation@<layer>``: that layer and all above it
    randomised) and at the last step (``model_randomisation_last``: the whole model randomised
    unless ``layers`` stops earlier), the input of ``barely_changes``.
    """

    name = "model_randomisation"
    title = "Model randomisation (cascading)"
    order = "cascading"


@register
class IndependentRandomisation(_Randomisation):
    """Mean similarity of the map to the maps of the model with one layer at a time randomised
    (Adebayo et al.'s independent randomisation). Companions as ``model_randomisation`` (per step:
    only that layer randomised), without ``_last``."""

    name = "independent_randomisation"
    title = "Model randomisation (independent)"
    order = "independent"


def other_classes(targets: torch.Tensor, indices: torch.Tensor, classes: int, seed: int) -> torch.Tensor:
    """A class other than the target per image, uniform over the other ``classes − 1``, drawn from
    the image's dataset index and ``seed`` alone (an integer hash: the same in any batch)."""
    offsets = [noise_seed(seed, int(i)) % (classes - 1) for i in indices.tolist()]
    offsets = torch.tensor(offsets, dtype=torch.int64, device=targets.device)
    return (targets.to(torch.int64) + 1 + offsets) % classes


@register
class RandomLogit(Metric):
    """Similarity of the map for the target to the map for a random other class (Sixt et al., 2020;
    Quantus's ``RandomLogit``, SSIM by default as there): a class-sensitive map changes with the class.

    Companions: the other similarities (``random_logit_spearman``, ``random_logit_hog`` by default).
    """

    name = "random_logit"
    title = "Random logit"
    direction = "lower"
    needs = frozenset({"model", "maps", "explain"})
    config = RandomLogitConfig

    def evaluate_batch(
        self,
        *,
        model: nn.Module,
        maps: torch.Tensor,
        explain: Explain,
        images: torch.Tensor,
        targets: torch.Tensor,
        indices: torch.Tensor,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        p = self.params
        with torch.no_grad():
            classes = model(images[:1]).shape[1]
        if classes < 2:
            raise RoarError(f"random_logit needs at least two classes, the model has {classes}")
        others = other_classes(targets, indices, classes, p.seed)
        comparison = Comparison(prepare(maps, p.absolute, p.normalise), p.similarities)
        values = comparison.to(prepare(explain(model, images, others), p.absolute, p.normalise))
        return _named(self.name, p.similarity, values)
