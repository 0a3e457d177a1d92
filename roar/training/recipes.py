"""Named training recipes: presets of the ``training`` section, chosen with ``recipe: <name>``.

A recipe is a partial training section; keys written beside ``recipe`` override the preset's, and
the resolved section (what ``roar config`` prints and every run's ``config.yaml`` records) holds
the recipe's name with every value it set. Recipes change how a model is trained, never which model
is trained: ROAR/KAR retraining must keep the architecture of the base model it evaluates.

* ``seed``: the ROAR seed's CIFAR-10 recipe (Adam 1e-3, weight decay 1e-4, the learning rate
  halved every 10 epochs, 50 epochs, batch 256, random crop and flip).
* ``fast``: the recipe that reaches the base model's accuracy in the fewest epochs and seconds,
  found by the lever-by-lever ablation in ``docs/benchmarks.md`` (``python -m benchmarks.recipes``):
  a whitening-initialised first convolution, a high learning rate (Adam 0.012, 3x the demo's old
  rate) with a linear warm-up over the first 20% of the steps and a linear decay, small batches
  (48: more updates per image seen), label smoothing 0.2, no random crop (flips only: crops slow a
  three-epoch schedule down). The retraining sweep's default.
"""

from __future__ import annotations

import copy
from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "seed": {
        "epochs": 50,
        "batch_size": 256,
        "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4},
        "schedule": {"name": "step", "step_epochs": 10, "gamma": 0.5},
        "augment": {"crop_padding": 4, "flip": True},
    },
    "fast": {
        "epochs": 3,
        "batch_size": 48,
        "optimizer": {"name": "adam", "lr": 0.012, "weight_decay": 1e-4},
        "schedule": {"name": "onecycle", "warmup_fraction": 0.2},
        "augment": {"crop_padding": 0, "flip": True},
        "label_smoothing": 0.2,
        "whiten_init": True,
    },
}


def merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section (a nested mapping merges, anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_recipe(data: Any) -> Any:
    """A raw training section with its ``recipe``'s preset filled in under the keys it sets itself."""
    if not isinstance(data, dict) or data.get("recipe") is None:
        return data
    name = data["recipe"]
    if name not in RECIPES:
        from pydantic_core import PydanticCustomError

        from roar.core.registry import closest

        raise PydanticCustomError(
            "unknown_name",
            "unknown recipe '{name}'{hint}; known: {known}",
            {
                "key": "recipe",
                "name": str(name),
                "hint": closest(str(name), list(RECIPES)),
                "known": ", ".join(RECIPES),
            },
        )
    return merge(RECIPES[name], data)
