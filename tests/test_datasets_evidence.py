"""Ground truth of insecurity maps (``pair_evidence``): cub200 and ade20k on tiny fake trees, and
the default of in-memory splits. Everything is built in tmp_path; nothing is downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from roar.core.errors import RoarError
from roar.data import DATASETS, TensorSplit, build_dataset
from roar.data import ade20k as ade
from roar.data import cub200 as cub

W, H = 40, 30  # every fake image is 40 wide, 30 high


def config(name: str, **kw):
    return DATASETS.config_class(name)(**kw)


def centroid(mask: torch.Tensor) -> tuple[float, float]:
    """(column, row) mean of the True pixels, in pixel indices."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return float(cols.double().mean()), float(rows.double().mean())


# ---------------------------------------------------------------- the default of in-memory splits


def test_tensor_split_evidence_is_the_objects_of_the_two_classes():
    masks = torch.zeros(2, 8, 8, dtype=torch.uint8)
    masks[0, :3, :3] = 1  # the labelled object (class 0)
    masks[0, 5:, 5:] = 2  # a second object, of class 2
    masks[1, 2:6, 2:6] = 1
    split = TensorSplit(torch.zeros(2, 3, 8, 8), [0, 1], masks=masks, other_labels=[2, -1])
    both = split.pair_evidence(0, 0, 2)
    assert torch.equal(both, masks[0] > 0)
    assert torch.equal(split.pair_evidence(0, 2, 0), both)  # the order of the classes does not matter
    assert torch.equal(split.pair_evidence(0, 0, 1), masks[0] == 1)  # class 1 is in no object of image 0
    assert not split.pair_evidence(0, 3, 4).any()
    assert torch.equal(split.pair_evidence(1, 1, 2), masks[1] == 1)  # no second object: other label -1
    assert TensorSplit(torch.zeros(2, 3, 8, 8), [0, 1]).pair_evidence(0, 0, 1) is None
    assert TensorSplit(torch.zeros(2, 3, 8, 8), [0, 1], masks=masks).pair_evidence(0, 0, 1) is None


# ---------------------------------------------------------------- cub200

PARTS = [
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
    "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat",
]  # fmt: skip
ATTRIBUTES = [
    "has_bill_shape::dagger",
    "has_bill_shape::hooked",
    "has_wing_color::blue",
    "has_wing_color::brown",
    "has_size::small_(5_-_9_in)",
    "has_under_tail_color::white",
    "has_underparts_color::white",
]
# Per class: bill (dagger, hooked), wing (blue, brown), size, under tail, underparts.
# Albatross and Gull: bills alike (cos 0.998), wings not (0.34), underparts alike (one attribute, both > 0),
# no under-tail attribute (never shared). Gull and Wren: wings alike (0.99). Albatross and Wren: nothing alike.
STRENGTHS = [
    [90, 10, 80, 20, 50, 0, 30],
    [85, 12, 10, 90, 50, 0, 40],
    [0, 100, 20, 80, 50, 0, 0],
]
CLASSES = ["001.Albatross", "002.Gull", "003.Wren"]
BEAK, WING, BREAST = (10, 5), (30, 20), (2, 15)  # keypoints of image 1 (an Albatross in the train split)


def write_cub(root, bad: dict[str, str] | None = None):
    """Six 40×30 JPEGs, two per class (odd ids train, even ids test), with CUB's text files.

    Image 1 is black with a white 3×3 block centred on its beak keypoint. ``bad`` replaces the
    text of the named files.
    """
    folder = root / "CUB_200_2011"
    images, labels, split, locs = [], [], [], []
    for image_id in range(1, 7):
        label = (image_id + 1) // 2
        rel = f"{CLASSES[label - 1]}/img_{image_id}.jpg"
        (folder / "images" / CLASSES[label - 1]).mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((H, W, 3), dtype=np.uint8)
        if image_id == 1:
            pixels[BEAK[1] - 1 : BEAK[1] + 2, BEAK[0] - 1 : BEAK[0] + 2] = 255
        else:
            pixels[:] = (40 * label, 20 * image_id, 100)
        Image.fromarray(pixels).save(folder / "images" / rel, quality=95)
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {label}")
        split.append(f"{image_id} {image_id % 2}")
        for part in range(1, 16):
            x, y, visible = {2: (*BEAK, 1), 9: (*WING, 1), 3: (20, 20, 0), 4: (*BREAST, 1)}.get(part, (0, 0, 0))
            locs.append(f"{image_id} {part} {float(x) if image_id == 1 else 20.0} {float(y)} {visible}")
    texts = {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "train_test_split.txt": split,
        "classes.txt": [f"{k} {name}" for k, name in enumerate(CLASSES, start=1)],
        "parts/parts.txt": [f"{k} {name}" for k, name in enumerate(PARTS, start=1)],
        "parts/part_locs.txt": locs,
        "attributes/attributes.txt": [f"{k} {name}" for k, name in enumerate(ATTRIBUTES, start=1)],
        "attributes/class_attribute_labels_continuous.txt": [" ".join(f"{v:.6f}" for v in row) for row in STRENGTHS],
    }
    for name, lines in texts.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text((bad or {}).get(name, "\n".join(lines) + "\n"))
    return folder


def cub_config(root, **kw):
    return config("cub200", root=root, **{"resize": 30, "crop": 24, "part_radius": 0.1, **kw})


def test_cub_builds_labels_splits_and_geometry(tmp_path):
    write_cub(tmp_path)
    ds = build_dataset(cub_config(tmp_path))
    assert ds.name == "cub200" and ds.class_names == ["Albatross", "Gull", "Wren"]
    assert ds.train.labels.tolist() == [0, 1, 2] and ds.test.labels.tolist() == [0, 1, 2]
    assert ds.train.ids == [1, 3, 5] and ds.test.ids == [2, 4, 6]
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    for split in (ds.train, ds.test):
        assert not split.in_memory and split.geometry == (3, 24, 24)
        image, label = split[1]
        assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and int(label) == 1
    assert ds.info == {
        "root": str(tmp_path),
        "resize": 30,
        "crop": 24,
        "parts": PARTS,
        "shared_threshold": 0.8,
        "part_radius": 0.1,
    }
    again = build_dataset(cub_config(tmp_path))
    assert again.fingerprint() == ds.fingerprint() != build_dataset(cub_config(tmp_path, crop=20)).fingerprint()
    # dataset.root may also be the CUB_200_2011 folder itself
    assert build_dataset(cub_config(tmp_path / "CUB_200_2011")).fingerprint() == ds.fingerprint()


def test_resized_size_and_crop_anchor_are_torchvision_s():
    from torchvision.transforms.v2 import functional as F

    for width, height in ((40, 30), (30, 40), (500, 333), (333, 500), (31, 47), (64, 64)):
        for resize, crop in ((30, 24), (256, 224), (17, 9)):
            x = torch.arange(width * height, dtype=torch.float32).reshape(1, height, width)
            resized = F.resize(x, resize, antialias=True)
            assert tuple(resized.shape[1:]) == cub.resized_size(width, height, resize)[::-1]
            marker = torch.zeros_like(resized)
            left, top = cub.crop_anchor(resized.shape[2], resized.shape[1], crop)
            marker[0, top, left] = 1
            assert F.center_crop(marker, [crop, crop])[0, 0, 0] == 1


def test_cub_keypoint_lands_where_the_crop_puts_it(tmp_path):
    write_cub(tmp_path)
    # Without scaling (shorter side 30 = resize): the crop starts at column (40 - 24) / 2 = 8, row 3,
    # so the beak at pixel (10, 5) is pixel (2, 3 - 1) = (2, 2) of the crop.
    split = build_dataset(cub_config(tmp_path)).train
    beak, wing, breast = (PARTS.index(p) for p in ("beak", "left wing", "breast"))
    points = split.keypoints(0)
    assert points[beak].tolist() == [2.5, 2.5, 1.0]  # pixel centre (2.5, 2.5): pixel (2, 2)
    assert points[wing].tolist() == [22.5, 17.5, 1.0]
    assert points[breast, 2] == 0.0  # x = 2 falls left of the crop: dropped
    assert points[PARTS.index("belly"), 2] == 0.0  # not visible
    evidence = split.pair_evidence(0, 0, 1)  # Albatross and Gull share beak, belly and breast
    # The disk of radius 0.1 * 24 = 2.4 around (2.5, 2.5): offsets (di, dj) with di² + dj² <= 5.76.
    expected = torch.zeros(24, 24, dtype=torch.bool)
    for di in range(-2, 3):
        for dj in range(-2, 3):
            expected[2 + di, 2 + dj] = di * di + dj * dj <= 5.76
    assert evidence.dtype == torch.bool and torch.equal(evidence, expected) and int(evidence.sum()) == 21


def test_cub_keypoint_follows_the_resize(tmp_path):
    write_cub(tmp_path)
    # Scale 2: 40×30 → 80×60, crop 48 from column 16, row 6. Pixel (10, 5) covers columns 20..21 and
    # rows 10..11 of the resized image, i.e. columns 4..5 and rows 4..5 of the crop: centre (4.5, 4.5).
    split = build_dataset(cub_config(tmp_path, resize=60, crop=48)).train
    evidence = split.pair_evidence(0, 0, 1)
    assert centroid(evidence) == (4.5, 4.5) and evidence[4:6, 4:6].all()
    image, _ = split[0]
    bright = image.float().mean(0) > 128  # the white block drawn around the beak
    column, row = centroid(bright)
    assert abs(column - 4.5) <= 0.5 and abs(row - 4.5) <= 0.5
    assert not evidence[30:, 40:].any()  # the left wing (u, v = 45, 35) is not shared by these two


def test_cub_part_sharing_rule(tmp_path):
    write_cub(tmp_path)
    ds = build_dataset(cub_config(tmp_path))
    parts = ds.train.parts
    shared = {pair: {PARTS[p] for p in np.flatnonzero(parts.shared(*pair))} for pair in ((0, 1), (1, 2), (0, 2))}
    assert shared[(0, 1)] == {"beak", "belly", "breast"}  # wings differ; under tail never described
    assert shared[(1, 2)] == {"left wing", "right wing"}
    assert shared[(0, 2)] == set()
    assert not ds.train.pair_evidence(0, 0, 2).any()  # nothing shared: an empty region, not None
    wings = ds.train.pair_evidence(0, 1, 2)  # the wing of image 0, though image 0 is of neither class
    assert torch.equal(wings, cub.disks(np.array([[22.5, 17.5]]), 2.4, 24)) and wings[17, 22]  # cut by the edge
    strict = build_dataset(cub_config(tmp_path, shared_threshold=0.9999))  # bills at cos 0.9996, underparts at 1
    assert {PARTS[p] for p in np.flatnonzero(strict.train.parts.shared(0, 1))} == {"belly", "breast"}


def test_attribute_parts_and_cosine_threshold():
    names = ["has_underparts_color::white", "has_under_tail_color::buff", "has_wing_shape::pointed", "has_size::large"]
    table = cub.attribute_parts(names, PARTS)
    assert [sorted(PARTS[p] for p in np.flatnonzero(row)) for row in table] == [
        ["belly", "breast"],
        ["tail"],
        ["left wing", "right wing"],
        [],  # whole-bird: no part
    ]
    parts_of = np.array([[True, False], [True, False], [False, True]])  # two attributes of part 0, one of part 1
    strengths = np.array([[3.0, 4.0, 10.0], [4.0, 3.0, 0.0], [6.0, 8.0, 5.0]])  # cos(0, 1) on part 0 = 24 / 25
    at = cub.part_sharing(strengths, parts_of, 0.96)
    assert at[1, 0, 0] and at[1, 2, 0]  # symmetric; cos(1, 2) on part 0 is 48 / 50
    assert at[0, 1].tolist() == [True, False]  # 0.96 reaches the threshold; class 1 never describes part 1
    assert not cub.part_sharing(strengths, parts_of, 0.97)[0, 1, 0]
    assert at[0, 2].tolist() == [True, True]  # same direction, twice the strength
    assert not at[1, 1, 1] and at[1, 1, 0]  # a part a class never describes is not shared, even with itself


def test_cub_reads_parts_and_attributes_only_for_evidence(tmp_path):
    write_cub(tmp_path, bad={"parts/part_locs.txt": "1 2 10.0 5.0 1\n1 9 30.0\n"})
    ds = build_dataset(cub_config(tmp_path))  # training needs no part locations
    ds.train[0]
    with pytest.raises(RoarError, match=r"part_locs.txt line 2: expected '<image id> <part id> <x> <y>"):
        ds.train.pair_evidence(0, 0, 1)


def test_cub_errors(tmp_path):
    with pytest.raises(RoarError, match="not found") as err:
        build_dataset(cub_config(tmp_path / "nowhere"))
    assert "CUB_200_2011/" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RoarError, match="holds no CUB_200_2011/images.txt"):
        build_dataset(cub_config(tmp_path))

    bad = tmp_path / "bad"
    folder = write_cub(bad, bad={"image_class_labels.txt": "1 1\n2 1\n3 two\n"})
    with pytest.raises(RoarError) as err:
        build_dataset(cub_config(bad))
    assert f"{folder / 'image_class_labels.txt'} line 3" in str(err.value) and "'3 two'" in str(err.value)

    flags = tmp_path / "flags"
    write_cub(flags, bad={"train_test_split.txt": "1 1\n2 yes\n"})
    with pytest.raises(RoarError, match=r"train_test_split.txt line 2: expected '<image id> <1 train \| 0 test>'"):
        build_dataset(cub_config(flags))

    gone = tmp_path / "gone"
    folder = write_cub(gone)
    (folder / "images" / "002.Gull" / "img_4.jpg").unlink()
    with pytest.raises(RoarError, match="img_4.jpg listed in images.txt .id 4. is missing"):
        build_dataset(cub_config(gone))
    (folder / "parts" / "part_locs.txt").unlink()
    with pytest.raises(RoarError, match="file missing: .*part_locs.txt"):
        build_dataset(cub_config(gone))

    rows = tmp_path / "rows"
    write_cub(rows, bad={"attributes/class_attribute_labels_continuous.txt": "1 2 3\n"})
    ds = build_dataset(cub_config(rows))
    with pytest.raises(RoarError, match="continuous.txt line 1: expected 7 numbers"):
        ds.train.pair_evidence(0, 0, 1)
    with pytest.raises(ValueError):
        cub_config(rows, resize=20, crop=24)


# ---------------------------------------------------------------- ade20k

OBJECTS = ["wall", "bed", "lamp", "car"]  # labels 1..4
# Training annotations, by the objects (labels) each contains. With object_share 0.5: bedroom has
# wall and bed typical (lamp in 1 of 3), hotel_room bed and lamp (wall in 1 of 3), street wall and car.
TRAIN = {
    "bedroom": [{1, 2}, {1, 2, 3}, {1, 2}],
    "hotel_room": [{2, 3}, {1, 2, 3}, {2, 3}],
    "street": [{1, 4}, {1, 4}],
    "attic": [{1}],  # one image: not a class at min_images 2
}
VAL = ["bedroom", "hotel_room", "street", "attic"]


def label_map(objects: set[int]) -> np.ndarray:
    """40×30 labels: horizontal bands of 6 rows per object 1..4 if present (0 elsewhere)."""
    labels = np.zeros((H, W), dtype=np.uint8)
    for k in objects:
        labels[6 * (k - 1) : 6 * k] = k
    return labels


def write_ade(root):
    folder = root / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        for split in ("training", "validation"):
            (folder / kind / split).mkdir(parents=True)
    lines, n = [], 0
    for scene, contents in TRAIN.items():
        for objects in contents:
            n += 1
            save_ade_image(folder, "training", f"ADE_train_{n:08d}", objects, n)
            lines.append(f"ADE_train_{n:08d} {scene}")
    for k, scene in enumerate(VAL, start=1):
        save_ade_image(folder, "validation", f"ADE_val_{k:08d}", {1, 2, 3, 4}, k)
        lines.append(f"ADE_val_{k:08d} {scene}")
    (folder / "sceneCategories.txt").write_text("\n".join(lines) + "\n")
    rows = [f"{k}\t0.1\t10\t2\t{name}" for k, name in enumerate(OBJECTS, start=1)]
    (folder / "objectInfo150.txt").write_text("\n".join(["Idx\tRatio\tTrain\tVal\tName", *rows]) + "\n")
    return folder


def save_ade_image(folder, split, name, objects, seed):
    Image.new("RGB", (W, H), (30 * seed % 256, 90, 160)).save(folder / "images" / split / f"{name}.jpg")
    Image.fromarray(label_map(objects)).save(folder / "annotations" / split / f"{name}.png")


def ade_config(root, **kw):
    return config("ade20k", root=root, **{"resize": 30, "crop": 24, "min_images": 2, "object_share": 0.5, **kw})


def test_ade_builds_scenes_labels_and_geometry(tmp_path):
    write_ade(tmp_path)
    ds = build_dataset(ade_config(tmp_path))
    assert ds.name == "ade20k" and ds.class_names == ["bedroom", "hotel_room", "street"]
    assert ds.train.names == [f"ADE_train_{n:08d}" for n in range(1, 9)]  # attic's image left out
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert ds.test.names == [f"ADE_val_{k:08d}" for k in (1, 2, 3)] and ds.test.labels.tolist() == [0, 1, 2]
    for split in (ds.train, ds.test):
        image, label = split[0]
        assert split.geometry == (3, 24, 24) and image.shape == (3, 24, 24) and image.dtype == torch.uint8
    assert ds.info == {"root": str(tmp_path), "resize": 30, "crop": 24, "scenes": 3, "objects": 4, "object_share": 0.5}
    assert build_dataset(ade_config(tmp_path, min_images=1)).class_names == ["attic", "bedroom", "hotel_room", "street"]
    chosen = build_dataset(ade_config(tmp_path, scenes=["street", "bedroom"]))
    assert chosen.class_names == ["bedroom", "street"] and chosen.train.labels.tolist() == [0, 0, 0, 1, 1]
    assert build_dataset(ade_config(tmp_path)).fingerprint() == ds.fingerprint() != chosen.fingerprint()


def test_ade_evidence_is_the_objects_both_scenes_share(tmp_path):
    write_ade(tmp_path)
    ds = build_dataset(ade_config(tmp_path, cache_dir=tmp_path / "cache"))
    typical = ds.train.scene_objects.typical()
    assert [sorted(np.flatnonzero(row)) for row in typical] == [[1, 2], [2, 3], [1, 4]]
    # The validation images hold all four objects in bands of 6 rows: wall rows 0..5, bed 6..11,
    # lamp 12..17, car 18..23; the crop (no scaling) starts at row 3, column 8.
    rows = torch.arange(24)[:, None].expand(24, 24)
    bedroom, hotel, street = 0, 1, 2
    assert torch.equal(ds.test.pair_evidence(0, bedroom, hotel), (rows >= 3) & (rows < 9))  # bed only, no lamp
    assert torch.equal(ds.test.pair_evidence(0, bedroom, street), rows < 3)  # wall only
    assert not ds.test.pair_evidence(0, hotel, street).any()  # nothing typical of both
    assert torch.equal(ds.test.pair_evidence(2, bedroom, bedroom), rows < 9)  # a scene shares its own objects
    # Scale 2: 40×30 → 80×60, crop 48 from row 6: bed rows 6..11 → 12..23 → 6..17 of the crop (nearest).
    scaled = build_dataset(ade_config(tmp_path, resize=60, crop=48, cache_dir=tmp_path / "cache"))
    rows = torch.arange(48)[:, None].expand(48, 48)
    assert torch.equal(scaled.test.pair_evidence(1, bedroom, hotel), (rows >= 6) & (rows < 18))
    with pytest.raises(IndexError):
        ds.test.pair_evidence(0, 0, 3)


def test_ade_presence_is_lazy_cached_and_rebuilt(tmp_path, monkeypatch):
    folder = write_ade(tmp_path)
    calls = []
    real = ade.object_presence
    monkeypatch.setattr(ade, "object_presence", lambda *a: calls.append(a[1]) or real(*a))
    ds = build_dataset(ade_config(tmp_path))
    ds.train[0], ds.test[1], ds.fingerprint()
    assert calls == [] and not (folder / ade.CACHE).exists()  # building and reading images reads no annotation
    before = ds.test.pair_evidence(0, 0, 1)
    assert len(calls) == 1 and len(calls[0]) == 9 and (folder / ade.CACHE).is_file()  # every training annotation
    ds.test.pair_evidence(1, 0, 2)
    assert len(calls) == 1  # once per dataset
    again = build_dataset(ade_config(tmp_path, object_share=0.6, scenes=["bedroom", "hotel_room"]))
    assert torch.equal(again.test.pair_evidence(0, 0, 1), before) and len(calls) == 1  # read from the cache
    # A lamp in a second bedroom image makes it typical of bedrooms (2 of 3): the cache is stale.
    path = folder / "annotations" / "training" / "ADE_train_00000001.png"
    size = path.stat().st_size
    Image.fromarray(label_map({1, 2, 3})).save(path)
    assert path.stat().st_size != size
    changed = build_dataset(ade_config(tmp_path)).test.pair_evidence(0, 0, 1)
    assert len(calls) == 2
    rows = torch.arange(24)[:, None].expand(24, 24)
    assert torch.equal(changed, (rows >= 3) & (rows < 15))  # bed and lamp
    (folder / ade.CACHE).write_bytes(b"not a zip")  # a damaged cache is recomputed, not an error
    assert torch.equal(build_dataset(ade_config(tmp_path)).test.pair_evidence(0, 0, 1), changed)
    assert len(calls) == 3


def test_ade_errors(tmp_path):
    with pytest.raises(RoarError, match="not found") as err:
        build_dataset(ade_config(tmp_path / "nowhere"))
    assert "ADEChallengeData2016/" in str(err.value) and "\n" not in str(err.value)

    folder = write_ade(tmp_path)
    with pytest.raises(RoarError, match="unknown scene 'bedrom' .did you mean 'bedroom'"):
        build_dataset(ade_config(tmp_path, scenes=["bedrom", "street"]))
    with pytest.raises(RoarError, match="dataset.min_images=4 keeps 0 scene"):
        build_dataset(ade_config(tmp_path, min_images=4))

    scenes = folder / "sceneCategories.txt"
    text = scenes.read_text()
    scenes.write_text(text.replace("ADE_train_00000002 bedroom", "ADE_train_00000002"))
    with pytest.raises(RoarError) as err:
        build_dataset(ade_config(tmp_path))
    assert f"{scenes} line 2: expected '<image name> <scene>'" in str(err.value)
    scenes.write_text(text.replace("ADE_train_00000003 bedroom", "ADE_train_00000003 bed room"))
    with pytest.raises(
        RoarError, match="sceneCategories.txt line 3: expected '<image name> <scene>', got '.* bed room'"
    ):
        build_dataset(ade_config(tmp_path))
    scenes.write_text(text + "ADE_train_00000099 street\n")
    with pytest.raises(RoarError, match="image ADE_train_00000099 listed in .*sceneCategories.txt is missing"):
        build_dataset(ade_config(tmp_path))
    scenes.write_text(text)

    info = folder / "objectInfo150.txt"
    info.write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t10\t2\twall\n3\t0.1\t10\t2\tbed\n")
    with pytest.raises(RoarError, match="objectInfo150.txt line 3: expected object 2, got '3'"):
        build_dataset(ade_config(tmp_path))
    info.write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t10\t2\twall\n")  # labels 2..4 are beyond it
    ds = build_dataset(ade_config(tmp_path))
    with pytest.raises(RoarError, match="has label [234], beyond the 1 objects of objectInfo150.txt"):
        ds.test.pair_evidence(0, 0, 1)
