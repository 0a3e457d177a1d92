"""Class maps, difficulty scores and difficulty maps of deliberative explanations (Wang & Vasconcelos, NeurIPS 2019).

Everything lives at one layer of the classifier, with features F [B, K, h, w] (their VGG16:
conv5_3; ResNet8: ``layer3``); y are the logits, T = 5 the top predicted classes by logit.

**Class maps** A_c(i, j) = max(0, Σ_k F_k(i, j) · ∂y_c/∂F_k(i, j)) for each top class c
("gradient"); "ig" replaces F ⊙ ∂y_c/∂F by layer Integrated Gradients,
(F − F0) ⊙ ∫ ∂y_c/∂F(F0 + α(F − F0)) dα (``ig_steps`` Gauss-Legendre points), F0 the features of
a black image. "2ndg" uses the gradient class maps (the same tensor): its second-order term is
for difficulty maps only.

**Difficulty scores** s: "cs" (``hesitancy``) 1 − max softmax; "entropy"
(``normalised_entropy``) H(softmax) / log C; "hp" a hardness predictor on the features
(``predictor_score``: the network is trained elsewhere). **Difficulty maps** D = Σ_k F_k ⊙
ReLU(∂s/∂F_k) ("gradient"), Σ_k (F_k − F0_k) ⊙ ReLU(mean path gradient of s) ("ig"), and
D_gradient + ½ |q| ("2ndg") with q(i, j) = F(i, j)ᵀ H(i, j) F(i, j), H(i, j) the K×K block of the
Hessian of s at location (i, j).

Why these choices:

* **Black baseline.** The paper's IG reference. Images are in [0, 1] and the model normalises them
  itself (``roar.models.Classifier``), so zeros are a real black image, not the dataset mean that
  a zero *normalised* input would be.
* **Clipping at 0.** Every class map and difficulty map is clipped at 0 from below, so that an
  insecurity map A_a ⊙ A_b ⊙ D can only be large where both classes and the difficulty have
  positive evidence: without clipping, two negative class maps would multiply to a large positive
  value where neither class is present. (The ReLU inside D keeps only the features whose growth
  raises the difficulty; the final clip matters at layers whose features can be negative.)
* **Hessian-vector products.** The Hessian of s with respect to F has (K·h·w)² entries (10¹⁰ at
  conv5_3), but q needs only its diagonal K×K blocks contracted with F: one forward-over-reverse
  Hessian-vector product per location, vmapped over the locations, gives them all
  (``roar.attribution.layer.layer_quadratic``).

Per chunk of images, the gradient variant takes one forward pass and T + S backward passes (one
score function returns the T class logits and the S difficulty scores), IG one batched path pass
for all of them, 2ndG one vmapped HVP pass per difficulty score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from roar.attribution.engine import DEFAULT_MAX_BATCH, max_batch_for
from roar.attribution.gradcam import resolve_layer
from roar.attribution.layer import layer_features, layer_gradients, layer_path_gradients, layer_quadratic
from roar.core.errors import RoarError

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [B, C], features [B, K, h, w]) -> [B]

VARIANTS = ("gradient", "ig", "2ndg")


def hesitancy(logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
    """Score "cs": 1 − max softmax, [B]; 0 for a certain prediction, 1 − 1/C for a uniform one."""
    return 1 - logits.softmax(1).amax(1)


def normalised_entropy(logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
    """Score "entropy": H(softmax) / log C in [0, 1], [B]; from log-softmax so that p → 0 stays finite."""
    if logits.shape[1] < 2:
        raise RoarError("the entropy difficulty score needs at least 2 classes")
    log_p = logits.log_softmax(1)
    return -(log_p.exp() * log_p).sum(1) / math.log(logits.shape[1])


SCORES: dict[str, ScoreFn] = {"cs": hesitancy, "entropy": normalised_entropy}


def _per_image(values: torch.Tensor, b: int, name: str) -> torch.Tensor:
    if values.numel() != b:
        raise RoarError(f"difficulty score '{name}' must give one value per image ([{b}]), got {tuple(values.shape)}")
    return values.reshape(b)


def predictor_score(module: Callable[[torch.Tensor], torch.Tensor]) -> ScoreFn:
    """The "hp" score: a hardness predictor ``features [B, K, h, w] -> [B]`` as a score function.

    An ``nn.Module`` runs in eval mode during each call (its mode is restored after), so dropout or
    batch statistics never vary the score. Its parameters are left as they are: ``requires_grad_``
    is refused inside ``torch.func`` transforms (2ndG), and the engine differentiates with respect
    to the features only, so no ``.grad`` is ever written into the predictor.
    """

    def score(logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        training = isinstance(module, nn.Module) and module.training
        if training:
            module.eval()
        try:
            values = module(features)
        finally:
            if training:
                module.train()
        return _per_image(values, len(features), "hp")

    return score


@dataclass
class DeliberationMaps:
    """The maps of a batch; every map is ≥ 0 and at the layer's resolution h×w."""

    top: torch.Tensor  # int64 [B, T]: top predicted classes, descending logit
    logits: torch.Tensor  # [B, C]
    class_maps: dict[str, torch.Tensor]  # variant -> [B, T, h, w]
    difficulty: dict[tuple[str, str], torch.Tensor]  # (score, variant) -> [B, h, w]
    scores: dict[str, torch.Tensor]  # score -> [B], its value on the image


def _stacked(scores: Mapping[str, ScoreFn]) -> ScoreFn | None:
    """One score function [B, S] for all difficulty scores, so one pass serves them all."""
    if not scores:
        return None
    items = list(scores.items())

    def score(logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([_per_image(fn(logits, features), len(logits), name) for name, fn in items], 1)

    return score


def _contribution(features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Σ_k features_k ⊙ grads_k clipped at 0: features [B, K, h, w], grads [B, S, K, h, w] -> [B, S, h, w]."""
    return (features.unsqueeze(1) * grads).sum(2).clamp(min=0)


def _check(variants: tuple[str, ...], top: int, ig_steps: int) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise RoarError(f"deliberation maps: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if top < 1:
        raise RoarError(f"deliberation maps: top must be at least 1, got {top}")
    if "ig" in variants and ig_steps < 1:
        raise RoarError(f"deliberation maps: ig_steps must be at least 1, got {ig_steps}")


def _chunk_maps(model, images, layer, scores, variants, top, ig_steps, max_batch) -> DeliberationMaps:
    """All maps of one chunk of images (the engine's chunks of rows run inside)."""
    logits, features = layer_features(model, images, layer, max_batch=max_batch)
    if top > logits.shape[1]:
        raise RoarError(f"deliberation maps: top {top} exceeds the model's {logits.shape[1]} classes")
    classes = logits.topk(top, dim=1).indices
    with torch.no_grad():
        values = {name: _per_image(fn(logits, features), len(images), name).detach() for name, fn in scores.items()}
    stacked, names = _stacked(scores), list(scores)
    class_maps, difficulty = {}, {}
    if "gradient" in variants or "2ndg" in variants:
        feats, grads = layer_gradients(model, images, layer, stacked, targets=classes, max_batch=max_batch)
        class_maps["gradient"] = _contribution(feats, grads[:, :top])
        spent = _contribution(feats, grads[:, top:].clamp(min=0))
        for i, name in enumerate(names):
            difficulty[name, "gradient"] = spent[:, i]
        if "2ndg" in variants:
            class_maps["2ndg"] = class_maps["gradient"]
            for name in names:
                q = layer_quadratic(model, images, layer, scores[name], max_batch=max_batch)
                difficulty[name, "2ndg"] = difficulty[name, "gradient"] + 0.5 * q.abs()
    if "ig" in variants:
        feats, base, mean_grads = layer_path_gradients(
            model,
            images,
            layer,
            stacked,
            baseline_images=torch.zeros_like(images),
            steps=ig_steps,
            targets=classes,
            max_batch=max_batch,
        )
        delta = feats - base
        class_maps["ig"] = _contribution(delta, mean_grads[:, :top])
        spent = _contribution(delta, mean_grads[:, top:].clamp(min=0))
        for i, name in enumerate(names):
            difficulty[name, "ig"] = spent[:, i]
    return DeliberationMaps(
        top=classes,
        logits=logits,
        class_maps={v: class_maps[v] for v in variants},
        difficulty={(name, v): difficulty[name, v] for name in names for v in variants},
        scores=values,
    )


def _concatenate(parts: list[DeliberationMaps], variants: tuple[str, ...]) -> DeliberationMaps:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    class_maps = {v: torch.cat([p.class_maps[v] for p in parts]) for v in variants if v != "2ndg"}
    if "2ndg" in variants:  # the gradient class maps, the same tensor (computed anyway for 2ndG)
        gradient = class_maps.get("gradient")
        class_maps["2ndg"] = gradient if gradient is not None else torch.cat([p.class_maps["2ndg"] for p in parts])
    return DeliberationMaps(
        top=torch.cat([p.top for p in parts]),
        logits=torch.cat([p.logits for p in parts]),
        class_maps={v: class_maps[v] for v in variants},
        difficulty={key: torch.cat([p.difficulty[key] for p in parts]) for key in first.difficulty},
        scores={name: torch.cat([p.scores[name] for p in parts]) for name in first.scores},
    )


def deliberation_maps(
    model: nn.Module,
    images: torch.Tensor,
    layer: nn.Module | str,
    scores: Mapping[str, ScoreFn],
    variants: Iterable[str] = VARIANTS,
    top: int = 5,
    ig_steps: int = 50,
    max_batch: int | None = DEFAULT_MAX_BATCH,
) -> DeliberationMaps:
    """Class maps of the ``top`` predicted classes and difficulty maps of ``scores`` at ``layer``.

    ``layer`` is a module of ``model`` (or a name for ``resolve_layer``); ``scores`` maps names to
    difficulty score functions ``(logits, features) -> [B]`` (``SCORES``, ``predictor_score``).
    Every map is clipped at 0 from below (see the module docstring: an insecurity product of two
    negative maps must not look like evidence). Images are taken ``max_batch`` at a time, so the
    gradients held at once ([chunk, T + S, K, h, w]) stay bounded whatever the batch.
    """
    variants = tuple(dict.fromkeys(variants))
    _check(variants, top, ig_steps)
    if isinstance(layer, str):
        _, layer = resolve_layer(model, layer, images)
    if len(images) == 0:
        raise RoarError("deliberation maps: no images")
    chunk = max_batch_for(images.device, max_batch)
    parts = [
        _chunk_maps(model, images[start : start + chunk], layer, scores, variants, top, ig_steps, max_batch)
        for start in range(0, len(images), chunk)
    ]
    return _concatenate(parts, variants)
