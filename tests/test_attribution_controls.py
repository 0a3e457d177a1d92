"""The model-independent controls: random, sobel (against scipy.ndimage.sobel), ground_truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from roar.attribution.base import Context
from roar.attribution.controls import GroundTruth, RandomMap, Sobel
from roar.attribution.registry import METHODS
from roar.core.errors import RoarError


def test_registered_model_free():
    for name, cls in (("random", RandomMap), ("sobel", Sobel), ("ground_truth", GroundTruth)):
        method = METHODS.create(name)
        assert isinstance(method, cls) and not method.requires_model and method.passes == 0


def test_random_reproducible_per_generator():
    images = torch.rand(4, 3, 10, 12)
    method = RandomMap()
    first = method(None, images, torch.zeros(4), generator=torch.Generator().manual_seed(7))
    again = method(None, images, torch.zeros(4), generator=torch.Generator().manual_seed(7))
    other = method(None, images, torch.zeros(4), generator=torch.Generator().manual_seed(8))
    assert first.shape == (4, 1, 10, 12) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() < 1
    assert not torch.equal(first[0], first[1])  # each image its own draw


def scipy_sobel(images: np.ndarray) -> np.ndarray:
    """sqrt(Σ_c sobel_rows² + sobel_cols²) with scipy's defaults (mode='reflect'), float64."""
    out = np.zeros((images.shape[0], 1, *images.shape[2:]))
    for b, image in enumerate(images):
        for channel in image:
            out[b, 0] += ndimage.sobel(channel, axis=0) ** 2 + ndimage.sobel(channel, axis=1) ** 2
    return np.sqrt(out)


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 1, 7, 13), (2, 4, 11, 5)])
def test_sobel_matches_scipy(shape):
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    ours = Sobel()(None, images, torch.zeros(shape[0]))
    expected = scipy_sobel(images.double().numpy())
    assert ours.shape == (shape[0], 1, *shape[2:]) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_sobel_of_constant_image_is_zero_and_edge_is_found():
    images = torch.full((1, 3, 8, 8), 0.3)
    assert Sobel()(None, images, torch.zeros(1)).abs().max() < 1e-6  # borders included: no padding artefact
    images[..., 4:] = 1.0
    edges = Sobel()(None, images, torch.zeros(1))[0, 0]
    assert edges[:, 3:5].min() > 0 and edges[:, :3].max() == 0 and edges[:, 5:].max() == 0


def test_ground_truth_is_the_labelled_object():
    masks = torch.tensor(np.random.default_rng(0).integers(0, 3, size=(3, 9, 9)), dtype=torch.uint8)
    images = torch.rand(3, 3, 9, 9)
    out = GroundTruth()(None, images, torch.zeros(3), context=Context(masks=masks))
    assert out.shape == (3, 1, 9, 9) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], (masks == 1).float())
    assert set(out.unique().tolist()) == {0.0, 1.0}


def test_ground_truth_needs_masks():
    images = torch.rand(2, 3, 9, 9)
    with pytest.raises(RoarError, match=r"ground_truth needs a dataset with object masks \(e.g. shapes\)"):
        GroundTruth()(None, images, torch.zeros(2))
    with pytest.raises(RoarError, match="masks have shape"):
        GroundTruth()(None, images, torch.zeros(2), context=Context(masks=torch.zeros(2, 8, 9, dtype=torch.uint8)))
