"""The built-in dataset: deterministic, balanced, masks on the objects, hard examples tagged."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_erosion
from sklearn.linear_model import RidgeClassifier

from roar.data import TAGS, build_dataset
from roar.data.shapes import CLASS_NAMES, ShapesConfig, generate


@pytest.fixture(scope="module")
def sample():
    return generate(600, seed=3, size=32, hard_fraction=0.3, distractors=3)


def test_same_seed_same_images_and_example_independent_of_size(sample):
    images, labels, masks, tags, others = sample
    again = generate(600, seed=3, size=32, hard_fraction=0.3, distractors=3)
    for a, b in zip(sample, again):
        np.testing.assert_array_equal(a, b)
    other = generate(600, seed=4, size=32, hard_fraction=0.3, distractors=3)
    assert not np.array_equal(images, other[0])


def test_classes_balanced_and_hard_fraction_controlled(sample):
    images, labels, masks, tags, others = sample
    assert images.shape == (600, 3, 32, 32) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [60] * 10
    assert (tags > 0).sum() == 180  # 30% hard
    counts = np.bincount(tags, minlength=len(TAGS))
    assert counts[1:].tolist() == [60, 60, 60]


def test_every_object_has_a_mask_and_masks_lie_on_the_objects(sample):
    images, labels, masks, tags, others = sample
    for i in range(len(images)):
        for value in (1, 2) if others[i] >= 0 else (1,):
            obj = masks[i] == value
            assert obj.sum() >= 8, f"example {i} has almost no mask for object {value}"
            interior = binary_erosion(obj)
            if interior.sum() < 4:
                continue
            # Each object is painted in one solid colour: inside its mask almost every pixel has
            # that colour (a few near thin parts are blended with the background).
            pixels = images[i][:, interior].astype(int)
            colour = np.median(pixels, axis=1, keepdims=True)
            share = (np.abs(pixels - colour).max(axis=0) <= 2).mean()
            assert share >= 0.9, f"example {i}: mask {value} does not lie on a solid object ({share:.0%})"


def test_two_object_examples_carry_a_second_class_and_mask(sample):
    images, labels, masks, tags, others = sample
    two = tags == TAGS.index("two_objects")
    assert np.all(others[two] >= 0) and np.all(others[two] != labels[two])
    assert np.all(others[~two] == -1)
    assert all((masks[i] == 2).sum() >= 8 for i in np.nonzero(two)[0])
    assert not np.any(masks[~two] == 2)


def test_low_contrast_objects_are_closer_to_the_background(sample):
    images, labels, masks, tags, others = sample

    def contrast(i):
        img = images[i].astype(float)
        obj, bg = masks[i] == 1, binary_erosion(masks[i] == 0, iterations=2)
        return np.abs(img[:, obj].mean(1) - img[:, bg].mean(1)).sum()

    low = [contrast(i) for i in np.nonzero(tags == TAGS.index("low_contrast"))[0]]
    clean = [contrast(i) for i in np.nonzero(tags == 0)[0]]
    assert np.median(low) < 0.5 * np.median(clean)


def test_a_linear_model_on_raw_pixels_does_poorly():
    images, labels, *_ = generate(1200, seed=5, size=32, hard_fraction=0.0, distractors=3)
    x = images.reshape(len(images), -1) / 255.0
    accuracy = RidgeClassifier(alpha=10).fit(x[:800], labels[:800]).score(x[800:], labels[800:])
    assert accuracy < 0.4, f"linear model reaches {accuracy:.2f}: the class is too easy to read off pixels"


def test_dataset_is_cached_and_a_damaged_cache_is_regenerated(tmp_path):
    cfg = ShapesConfig(root=tmp_path, train_size=40, test_size=20)
    first = build_dataset(cfg)
    files = sorted((tmp_path / "shapes").glob("*.npz"))
    assert len(files) == 2
    files[0].write_bytes(b"not an npz file")
    second = build_dataset(cfg)
    assert first.fingerprint() == second.fingerprint()
    assert second.class_names == CLASS_NAMES and second.num_classes == 10
    assert first.train.fingerprint() != first.test.fingerprint()
    assert len(second.mean) == 3 and all(0 < s < 1 for s in second.std)
