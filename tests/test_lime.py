"""LIME and LIME-G (roar.attribution.lime) and the inpainting fills (roar.perturb.inpainters).

The ``lime`` package is the reference: on the same model, image and segmentation its superpixel
weights and ours agree in rank. The other tests could each fail on a plausible bug: a model that
only looks at one superpixel must get its top weight there, an image's map must not depend on its
batch, every inpainter must run inside LIME-G, and a bad plug-in must fail in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from roar.attribution import Context, create
from roar.attribution.lime import kernel_weights, superpixels
from roar.core.errors import RoarError
from roar.models import Classifier
from roar.models.resnet8 import ResNet8
from roar.perturb import ablate, build_fill, gaussian_blur

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

CALLS: list[tuple] = []  # what the plug-in inpainter below was called with


def blur_inpainter(images: torch.Tensor, removed: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """A plug-in inpainter (``fill: {name: plugin, function: test_lime.blur_inpainter}``): a blurred copy."""
    CALLS.append((tuple(images.shape), removed.dtype, tuple(removed.shape)))
    return gaussian_blur(images, sigma)


def cropping_inpainter(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    return images[..., 1:, :]


def path(name: str) -> str:
    return f"{__name__}.{name}"


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Blurred noise stretched to [0, 1]: images with regions for SLIC to find."""
    x = gaussian_blur(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)), 1.5)
    low, high = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    return (x - low) / (high - low)


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(ResNet8(10, 3, (8, 16, 16)), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()


def superpixel_weights(maps: torch.Tensor, segments: np.ndarray) -> np.ndarray:
    """The one value per superpixel that a map [1, H, W] paints."""
    flat, labels = maps.reshape(-1).numpy(), segments.reshape(-1)
    return np.array([flat[labels == j][0] for j in range(labels.max() + 1)])


# ---------------------------------------------------------------------------------------------- the lime package


def test_superpixel_weights_agree_in_rank_with_the_lime_package(model):
    lime_image = pytest.importorskip("lime.lime_image")
    from scipy.stats import spearmanr

    images = smooth_images(2)
    with torch.no_grad():
        targets = model(images).argmax(1)
    ours = create("lime", samples=2000)(model, images, targets, context=Context(indices=torch.arange(2)))

    def classifier_fn(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch).permute(0, 3, 1, 2).float()).softmax(1).double().numpy()

    for i, segments in enumerate(superpixels(images)):
        target = int(targets[i])
        explanation = lime_image.LimeImageExplainer(kernel_width=0.25, random_state=0).explain_instance(
            images[i].permute(1, 2, 0).double().numpy(),
            classifier_fn,
            labels=(target,),
            top_labels=None,
            hide_color=None,  # each hidden superpixel in its own mean colour: our segment_mean
            num_samples=2000,
            segmentation_fn=lambda image, segments=segments: segments,
        )
        theirs = np.zeros(segments.max() + 1)
        for feature, weight in explanation.local_exp[target]:
            theirs[feature] = weight
        mine = superpixel_weights(ours[i], segments)
        rho = spearmanr(mine, theirs).statistic
        assert rho >= 0.9, f"image {i}: Spearman {rho:.3f} between roar's and lime's superpixel weights"
        assert 0.5 < np.abs(mine).max() / np.abs(theirs).max() < 2  # the same scale, not only the same order


def test_kernel_is_lime_s_exponential_kernel_on_the_cosine_distance():
    from sklearn.metrics import pairwise_distances

    vectors = np.random.default_rng(0).integers(0, 2, (50, 7)).astype(bool)
    vectors[0], vectors[1] = True, False
    distance = pairwise_distances(vectors.astype(float), np.ones((1, 7)), metric="cosine").ravel()
    expected = np.sqrt(np.exp(-(distance**2) / 0.25**2))  # lime_image.LimeImageExplainer's default kernel
    np.testing.assert_allclose(kernel_weights(vectors, 0.25), expected, rtol=1e-12)


def test_segment_mean_is_lime_s_hide_color_none():
    image = smooth_images(1)
    segments = superpixels(image)[0]
    filled = build_fill("segment_mean")(image, torch.ones(1, 3, 32, 32, dtype=torch.bool), segments=segments[None])
    pixels = image[0].permute(1, 2, 0).double().numpy()
    for j in range(segments.max() + 1):  # lime_image.explain_instance's fudged_image
        expected = pixels[segments == j].mean(0)
        np.testing.assert_allclose(
            filled[0].permute(1, 2, 0).numpy()[segments == j],
            expected[None].repeat((segments == j).sum(), 0),
            rtol=1e-6,
        )


# ---------------------------------------------------------------------------------------------- what LIME finds


class OneRegion(nn.Module):
    """Class 0's logit is the contrast (variance) of the image inside ``region``; class 1's is 0."""

    def __init__(self, region: np.ndarray, scale: float = 200.0):
        super().__init__()
        self.register_buffer("region", torch.from_numpy(region).float())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = x * self.region
        count = self.region.sum()
        mean = inside.sum((2, 3), keepdim=True) / count
        variance = (((x - mean) * self.region) ** 2).sum((1, 2, 3)) / count
        return torch.stack([self.scale * variance - 1.0, torch.zeros_like(variance)], 1)


@pytest.mark.parametrize("name", ["lime", "lime_g"])
def test_a_model_looking_at_one_superpixel_gets_the_top_weight_there(name):
    image = smooth_images(1, seed=3)
    segments = superpixels(image)[0]
    sizes = np.bincount(segments.reshape(-1))
    known = int(np.argsort(sizes)[len(sizes) // 2])  # a superpixel of median size
    model = OneRegion(segments == known)
    maps = create(name, samples=200)(model, image, torch.tensor([0]))
    weights = superpixel_weights(maps[0], segments)
    assert int(np.argmax(np.abs(weights))) == known and weights[known] > 0
    others = np.delete(np.abs(weights), known)
    assert others.max() < 0.2 * weights[known], (
        f"{name}: other superpixels weigh up to {others.max() / weights[known]:.2f}"
    )


# ---------------------------------------------------------------------------------------------- batches, seeds


@pytest.mark.parametrize("name", ["lime", "lime_g"])
def test_an_image_gets_the_same_map_alone_as_in_a_batch(model, name):
    images = smooth_images(3, size=16, seed=5)
    targets = torch.tensor([1, 4, 7])
    indices = torch.tensor([12, 40, 3])
    method = create(name, samples=40, max_batch=32)  # chunks straddle the images
    together = method(model, images, targets, context=Context(indices=indices))
    order = torch.tensor([2, 0, 1])
    shuffled = method(model, images[order], targets[order], context=Context(indices=indices[order]))
    for i in range(3):
        rows = slice(i, i + 1)
        alone = create(name, samples=40, max_batch=32)(
            model, images[rows], targets[rows], context=Context(indices=indices[rows])
        )
        scale = together[i].abs().max()
        assert (alone[0] - together[i]).abs().max() <= 1e-6 * scale, f"{name}: image {i} depends on its batch"
    assert torch.allclose(shuffled, together[order], rtol=0, atol=1e-6 * float(together.abs().max()))
    moved = method(model, images[:1], targets[:1], context=Context(indices=torch.tensor([13])))
    assert not torch.equal(moved[0], together[0]), "the dataset index does not seed the samples"
    reseeded = create(name, samples=40, seed=1)(model, images[:1], targets[:1], context=Context(indices=indices[:1]))
    assert not torch.equal(reseeded[0], together[0]), "the seed parameter does not seed the samples"


# ---------------------------------------------------------------------------------------------- inpainters


@pytest.fixture
def small(model):
    images = smooth_images(2, size=16, seed=7)
    return model, images, torch.tensor([2, 5])


def check_map(maps: torch.Tensor, images: torch.Tensor) -> None:
    assert maps.shape == (len(images), 1, *images.shape[2:]) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0


def test_lime_g_runs_with_biharmonic_inpainting(small):
    model, images, targets = small
    method = create("lime_g", samples=12, fill={"name": "biharmonic"})
    check_map(method(model, images, targets), images)
    assert method.params.fill.name == "biharmonic" and create("lime_g").params.fill.name == "road"
    assert create("lime").params.fill.name == "segment_mean"


def test_lime_g_runs_with_a_plugin_inpainter(small):
    model, images, targets = small
    CALLS.clear()
    fill = {"name": "plugin", "function": path("blur_inpainter"), "kwargs": {"sigma": 2.0}}
    method = create("lime_g", samples=12, max_batch=8, fill=fill)
    check_map(method(model, images, targets), images)
    calls = [((8, 3, 16, 16), torch.bool, (8, 3, 16, 16))] * 3  # 24 perturbed images in chunks of 8
    assert calls == CALLS


def test_biharmonic_fill_is_scikit_image_s_inpainting():
    from skimage.restoration import inpaint_biharmonic

    images = smooth_images(2, size=12)
    removed = torch.zeros(2, 3, 12, 12, dtype=torch.bool)
    removed[0, :, 3:7, 2:9] = True
    removed[1, 1, 5:, :4] = True  # one channel only
    out = ablate(images, removed, build_fill("biharmonic"))
    first = inpaint_biharmonic(images[0].permute(1, 2, 0).double().numpy(), removed[0, 0].numpy(), channel_axis=-1)
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), first, atol=1e-6)
    second = inpaint_biharmonic(images[1, 1].double().numpy(), removed[1, 1].numpy())
    np.testing.assert_allclose(out[1, 1].numpy(), second, atol=1e-6)
    assert torch.equal(out[1, [0, 2]], images[1, [0, 2]])
    everything = ablate(images, torch.ones_like(removed), build_fill("biharmonic", mean=(0.1, 0.2, 0.3)))
    assert torch.allclose(everything[:, :, 0, 0], torch.tensor([[0.1, 0.2, 0.3]] * 2))


def test_a_bad_plugin_is_one_line_roar_error(small):
    model, images, targets = small
    bad = {
        "no_such_module.inpaint": "'no_such_module.inpaint': no module 'no_such_module' can be imported",
        path("no_such_function"): "has no 'no_such_function'",
        "inpaint": "expected a dotted path such as",
    }
    for function, message in bad.items():
        with pytest.raises(RoarError, match=message) as error:
            create("lime_g", fill={"name": "plugin", "function": function})
        assert "\n" not in str(error.value) and "fill 'plugin'" in str(error.value)
    method = create("lime_g", samples=4, fill={"name": "plugin", "function": path("cropping_inpainter")})
    with pytest.raises(RoarError, match=r"returned shape \[8, 3, 15, 16\]; expected the images' \[8, 3, 16, 16\]"):
        method(model, images, targets)


def test_fills_that_replace_patches_are_refused_and_mean_fills_use_the_model_s_mean(small):
    model, images, targets = small
    with pytest.raises(RoarError, match=r"lime: fill: fill 'patch_mean' replaces whole patches"):
        create("lime", fill="patch_mean")
    with pytest.raises(RoarError, match=r"lime_g: fill.nois: unknown key 'nois' \(did you mean 'noise'\?\)"):
        create("lime_g", fill={"name": "road", "nois": 0.1})
    method = create("lime", samples=6, fill="mean")  # the dataset mean comes from the Classifier's normalisation
    check_map(method(model, images, targets), images)
    assert method.fill_for(model).value == (0.5, 0.5, 0.5)
