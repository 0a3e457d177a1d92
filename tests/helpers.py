"""Small models and batches shared by the attribution tests."""

from __future__ import annotations

import torch
from torch import nn

from roar.attribution import Context, create, explainer
from roar.metrics import INPUTS
from roar.models.base import Classifier
from roar.models.resnet8 import ResNet8


def small_resnet8(varied_batchnorm: bool = True) -> Classifier:
    """A narrow ResNet8 in eval mode; with non-trivial BatchNorm statistics, as after training."""
    torch.manual_seed(0)
    model = Classifier(ResNet8(num_classes=10, widths=(8, 16, 16)), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    if varied_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def model_batch(size: int = 16, n: int = 4, varied_batchnorm: bool = True, full_range: bool = False):
    """(model, images in [0, 1], predicted targets); ``full_range`` makes every image span exactly [0, 1]."""
    model = small_resnet8(varied_batchnorm)
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    if full_range:
        images[:, 0, 0, 0], images[:, 0, 0, 1] = 0.0, 1.0
    with torch.no_grad():
        targets = model(images).argmax(1)
    return model, images, targets


def run_copy(trained_run, tmp_path, name, overrides=()):
    """(config, overrides) of a new run folder holding a copy of ``trained_run``'s model."""
    import shutil
    from pathlib import Path

    from roar.config import load_config

    out = tmp_path / name
    shutil.copytree(trained_run.run_dir / "train", out / "train")
    sets = [
        f"output_dir={out}",
        f"dataset.root={trained_run.dataset.root}",
        f"dataset.train_size={trained_run.dataset.train_size}",
        f"dataset.test_size={trained_run.dataset.test_size}",
        f"model.widths={trained_run.model.widths}",
        f"training.epochs={trained_run.training.epochs}",
        *overrides,
    ]
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    return load_config(smoke, sets), sets


def _seeded(build):
    """``build()`` under a fixed seed, leaving the global random state as it was: the same model every call."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build()


def full_batch(n: int = 6, size: int = 8, classes: int = 4) -> dict:
    """Every input of ``INPUTS`` for a batch, so one set of keywords serves every metric."""
    g = torch.Generator().manual_seed(5)
    inputs = {
        "images": torch.rand(n, 3, size, size, generator=g),
        "labels": torch.randint(0, classes, (n,), generator=g),
        "indices": torch.arange(10, 10 + n),
        "maps": torch.randn(n, size, size, generator=g),
        "masks": torch.rand(n, size, size, generator=g) > 0.6,
        "model": _seeded(lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, classes)).eval()),
        "clean": torch.rand(n, classes, generator=g).softmax(1),
        "perturbed": torch.rand(n, classes, generator=g).softmax(1),
        "targets": torch.randint(0, classes, (n,), generator=g),
    }
    inputs["explain"] = gradient_explainer(inputs["indices"])
    inputs["maps"][0] = 1.0  # a flat map: its top pixels come from the tie-break alone
    assert set(inputs) == set(INPUTS)
    return inputs


def gradient_explainer(indices: torch.Tensor):
    """The gradient, bound to a batch of these dataset indices as a stage binds it."""
    return explainer(create("gradient"), "sum_squares", 0, Context(indices=indices))


def rows(inputs: dict, index) -> dict:
    out = {k: v if k in ("model", "explain") else v[index] for k, v in inputs.items()}
    return {**out, "explain": gradient_explainer(out["indices"])}
