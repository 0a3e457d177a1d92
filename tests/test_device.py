"""The layout roar trains and attributes in must give the gradients of the default layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from roar.core.device import memory_format
from roar.models import MODELS, build_model


def _resnet8(widths):
    torch.manual_seed(0)
    cfg = MODELS.config_class("resnet8")(widths=widths)
    return build_model(cfg, 10, (3, 16, 16), (0.5,) * 3, (0.25,) * 3)


def _gradients(model, images, labels, fmt):
    model = model.to(memory_format=fmt)
    loss = F.cross_entropy(model(images.contiguous(memory_format=fmt)), labels)
    return torch.autograd.grad(loss, list(model.parameters()))


def test_the_cpu_layout_gives_the_gradients_of_the_default_layout(one_thread):
    """Strided 1×1 shortcut convolutions with 4 and 16 input channels: the cases oneDNN's AVX2 kernels
    get wrong (or crash on) in channels_last. Whatever layout ``memory_format`` picks for this CPU
    must reproduce the default layout's gradients."""
    fmt = memory_format(torch.device("cpu"))
    for widths in ([4, 8, 8], [16, 32, 32]):
        chosen, reference = _resnet8(widths).train(), _resnet8(widths).train()
        g = torch.Generator().manual_seed(1)
        images, labels = torch.rand(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
        for _ in range(3):
            for a, b in zip(
                _gradients(chosen, images, labels, fmt), _gradients(reference, images, labels, torch.contiguous_format)
            ):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_channels_last_is_kept_where_it_is_safe(monkeypatch):
    import roar.core.device as device

    monkeypatch.setattr(device, "cpu_channels_last_is_safe", lambda: True)
    assert memory_format(torch.device("cpu")) == torch.channels_last
    assert memory_format(torch.device("cpu"), channels_last=False) == torch.contiguous_format
    monkeypatch.setattr(device, "cpu_channels_last_is_safe", lambda: False)
    assert memory_format(torch.device("cpu")) == torch.contiguous_format
    assert memory_format(torch.device("cuda")) == torch.channels_last
