"""digits, cifar10 and folder/imagenet datasets: all offline, on bundled or tmp_path data."""

from __future__ import annotations

import os
import pickle
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from roar.core.errors import RoarError
from roar.data import DATASETS, TensorSplit, build_dataset


def config(name: str, **kw):
    return DATASETS.config_class(name)(**kw)


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return build_dataset(config("digits"))


def test_digits_shapes_and_split(digits):
    assert digits.name == "digits" and digits.class_names == [str(i) for i in range(10)]
    assert len(digits.train) + len(digits.test) == 1797
    assert abs(len(digits.test) - 0.2 * 1797) <= 1
    for split in (digits.train, digits.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.geometry == (3, 32, 32) and split.in_memory and split.masks is None
        assert torch.equal(split.images[:, 0], split.images[:, 2])  # grey replicated
        image, label = split[0]
        assert image.shape == (3, 32, 32) and 0 <= int(label) < 10
    assert digits.train.images.max() > 200  # the 0..16 range was stretched to 0..255
    assert len(digits.mean) == 3 and all(0 < m < 1 for m in digits.mean) and all(s > 0 for s in digits.std)


def test_digits_stratified_split_has_every_class(digits):
    full = torch.bincount(torch.cat([digits.train.labels, digits.test.labels]), minlength=10).double()
    for split, share in ((digits.train, 0.8), (digits.test, 0.2)):
        counts = torch.bincount(split.labels, minlength=10).double()
        assert (counts > 0).all()
        assert torch.allclose(counts, full * share, atol=1.0)  # stratified: per-class shares kept


def test_digits_deterministic_and_seeded(digits):
    again = build_dataset(config("digits"))
    assert again.fingerprint() == digits.fingerprint()
    assert torch.equal(again.train.images, digits.train.images)
    other = build_dataset(config("digits", seed=1))
    assert other.fingerprint() != digits.fingerprint()


def test_digits_upsampling_keeps_the_digit():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    ds = build_dataset(config("digits", channels=1, image_size=32, test_fraction=0.5))
    assert ds.train.geometry == (1, 32, 32) and len(ds.mean) == 1
    idx = np.sort(train_test_split(np.arange(1797), test_size=0.5, stratify=raw.target, random_state=0)[0])
    assert ds.train.labels.tolist() == raw.target[idx].tolist()
    originals = raw.images[idx].reshape(len(idx), -1) * 255 / 16
    back = F.avg_pool2d(ds.train.images.double(), 4).reshape(len(idx), -1).numpy()  # 32×32 → 8×8
    for k in range(0, len(idx), 37):
        assert np.corrcoef(originals[k], back[k])[0, 1] > 0.93
        assert abs(originals[k].mean() - back[k].mean()) < 1.0  # same scale and brightness, not only correlated
        nearest = int(((originals - back[k]) ** 2).sum(axis=1).argmin())
        assert np.array_equal(originals[nearest], originals[k])


def test_digits_config_is_validated():
    with pytest.raises(ValueError):
        config("digits", channels=2)
    with pytest.raises(ValueError):
        config("digits", image_size=4)
    with pytest.raises(ValueError):
        config("digits", test_fraction=0.9)


# ---------------------------------------------------------------- cifar10


def write_fake_cifar(root, n_train=6, n_test=5, seed=0):
    """A tiny CIFAR-10 in torchvision's pickle format: root/cifar10/cifar-10-batches-py/*."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else n_train
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        written[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": n_train}, f)
    return written


@pytest.fixture
def no_md5(monkeypatch):
    """The fake files cannot match the official checksums: check existence only."""
    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar10_missing_names_the_folder(tmp_path):
    with pytest.raises(RoarError) as err:
        build_dataset(config("cifar10", root=tmp_path))
    message = str(err.value)
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in message
    assert "dataset.download=true" in message and "\n" not in message


def test_cifar10_download_failure_is_one_line(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(RoarError) as err:
        build_dataset(config("cifar10", root=tmp_path, download=True))
    message = str(err.value)
    assert "download" in message and str(tmp_path / "cifar10") in message and "\n" not in message


def test_cifar10_reads_torchvision_format(tmp_path, no_md5):
    written = write_fake_cifar(tmp_path)
    ds = build_dataset(config("cifar10", root=tmp_path))
    assert ds.name == "cifar10" and ds.class_names[0] == "airplane" and ds.num_classes == 10
    assert len(ds.train) == 30 and len(ds.test) == 5
    assert ds.train.images.dtype == torch.uint8 and ds.train.geometry == (3, 32, 32)
    data, labels = written["data_batch_1"]
    assert torch.equal(ds.train.images[0], torch.as_tensor(data[0].reshape(3, 32, 32)))
    assert ds.train.labels[: len(labels)].tolist() == labels
    data, labels = written["test_batch"]
    assert torch.equal(ds.test.images, torch.as_tensor(data.reshape(-1, 3, 32, 32)))
    assert ds.test.labels.tolist() == labels
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)


def test_cifar10_seeded_subset(tmp_path, no_md5):
    write_fake_cifar(tmp_path)
    a = build_dataset(config("cifar10", root=tmp_path, train_size=7, test_size=3))
    b = build_dataset(config("cifar10", root=tmp_path, train_size=7, test_size=3))
    c = build_dataset(config("cifar10", root=tmp_path, train_size=7, test_size=3, seed=5))
    full = build_dataset(config("cifar10", root=tmp_path))
    assert len(a.train) == 7 and len(a.test) == 3
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    rows = {bytes(img.numpy()) for img in full.train.images}
    assert all(bytes(img.numpy()) in rows for img in a.train.images)
    with pytest.raises(RoarError, match="train_size"):
        build_dataset(config("cifar10", root=tmp_path, train_size=31))


def test_cifar10_checksum_failure_is_a_roar_error(tmp_path):
    write_fake_cifar(tmp_path)  # present but not the official files
    with pytest.raises(RoarError, match="damaged"):
        build_dataset(config("cifar10", root=tmp_path))


# ---------------------------------------------------------------- folder / imagenet


def write_folder(root, classes=("cat", "dog"), splits=("train", "val")):
    sizes = [(40, 60), (50, 50), (30, 45)]
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                if i == 1:  # a grey PNG
                    Image.new("L", (w, h), 40 * c + 10 * s + 30).save(d / f"{i}.png")
                elif i == 2:  # an RGBA PNG
                    Image.new("RGBA", (w, h), (200, 10 * c, 0, 128)).save(d / f"{i}.png")
                else:
                    Image.new("RGB", (w, h), (255, 0, 0) if c == 0 else (0, 0, 255)).save(d / f"{i}.jpg", quality=95)
            (d / "notes.txt").write_text("not an image")


def test_folder_geometry_labels_and_pixels(tmp_path):
    write_folder(tmp_path)
    ds = build_dataset(config("folder", root=tmp_path, resize=16, crop=12))
    assert ds.name == "folder" and ds.class_names == ["cat", "dog"]
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    for split in (ds.train, ds.test):
        assert not split.in_memory and split.images is None
        assert split.geometry == (3, 12, 12) and len(split) == 6
        assert split.labels.tolist() == [0, 0, 0, 1, 1, 1]
        for i in range(len(split)):
            image, label = split[i]
            assert image.shape == (3, 12, 12) and image.dtype == torch.uint8
            assert int(label) == int(split.labels[i])
    red, _ = ds.train[0]  # 0.jpg of "cat": solid red
    assert (red[0].int() - 255).abs().max() <= 3 and red[1:].int().max() <= 3
    grey, _ = ds.train[1]  # 1.png of "cat": grey 30 replicated to RGB
    assert (grey == 30).all()
    loader = torch.utils.data.DataLoader(ds.test, batch_size=4)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 12, 12) and labels.dtype == torch.int64


def test_read_gives_the_rows_asked_for_from_disk_and_from_memory(tmp_path):
    write_folder(tmp_path)
    on_disk = build_dataset(config("folder", root=tmp_path, resize=16, crop=12)).train
    in_memory = TensorSplit(torch.stack([on_disk[i][0] for i in range(len(on_disk))]), on_disk.labels)
    for split in (on_disk, in_memory):
        for rows, expected in ((slice(1, 4), [1, 2, 3]), ([5, 0, 2], [5, 0, 2]), (torch.tensor([4]), [4])):
            for workers in (0, 2) if not split.in_memory else (0,):
                images = split.read(rows, workers)
                assert torch.equal(images, torch.stack([on_disk[i][0] for i in expected])), (rows, workers)


def test_folder_fingerprint_is_stable_and_tracks_files(tmp_path):
    write_folder(tmp_path)
    cfg = config("folder", root=tmp_path, resize=16, crop=12)
    first = build_dataset(cfg).fingerprint()
    assert build_dataset(cfg).fingerprint() == first
    assert build_dataset(config("folder", root=tmp_path, resize=16, crop=8)).fingerprint() != first
    Image.new("RGB", (20, 20), (0, 255, 0)).save(tmp_path / "val" / "dog" / "extra.png")
    again = build_dataset(cfg)
    assert len(again.test) == 7 and again.fingerprint() != first


def test_imagenet_is_the_folder_builder(tmp_path):
    assert config("imagenet").root is not None
    write_folder(tmp_path, classes=("n01440764", "n01443537"))
    ds = build_dataset(config("imagenet", root=tmp_path, resize=20, crop=16))
    assert ds.name == "imagenet" and ds.train.geometry == (3, 16, 16) and ds.num_classes == 2


def test_folder_missing_paths(tmp_path):
    with pytest.raises(RoarError, match="dataset.root must point to an image folder"):
        build_dataset(config("folder"))
    with pytest.raises(RoarError, match="not found") as err:
        build_dataset(config("folder", root=tmp_path / "nowhere"))
    assert "train/<class>/*.jpg" in str(err.value)
    write_folder(tmp_path, splits=("train",))
    with pytest.raises(RoarError) as err:
        build_dataset(config("folder", root=tmp_path))
    assert str(tmp_path / "val") in str(err.value) and "val/<class>/*.jpg" in str(err.value)


def test_folder_empty_split_and_mismatched_classes(tmp_path):
    write_folder(tmp_path, splits=("train",))
    for name in ("cat", "dog"):
        (tmp_path / "val" / name).mkdir(parents=True)
    with pytest.raises(RoarError, match="no images in"):
        build_dataset(config("folder", root=tmp_path))

    other = tmp_path / "other"
    write_folder(other, splits=("train",))
    write_folder(other, classes=("cat", "bird"), splits=("val",))
    with pytest.raises(RoarError, match="different class folders") as err:
        build_dataset(config("folder", root=other))
    assert "only in train: dog" in str(err.value) and "only in val: bird" in str(err.value)


def test_folder_config_is_validated():
    with pytest.raises(ValueError):
        config("folder", resize=32, crop=64)
    with pytest.raises(ValueError):
        config("folder", std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError):
        config("folder", mean=(0.5, 0.5))
