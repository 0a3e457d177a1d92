"""The array store: precision, shapes, chunking, identities, refusals, resumption, files of the
earlier format, and SIGKILL safety."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from roar.core.errors import RoarError
from roar.store import (
    CHUNK_BYTES,
    FORMAT_VERSION,
    MapStore,
    StoreWriter,
    chunk_rows_for,
    describe,
    staging_path,
)

N = 300
GEOMETRY = (3, 64, 64)  # 8 KiB per float16 row: 64 rows per chunk, 5 chunks
METHODS = {
    "grad": {"method": "gradient", "params": {}},
    "ig": {"method": "integrated_gradients", "params": {"steps": 50, "baseline": "zeros"}},
}
IDENTITY = {"reduction": "sum_squares", "target": "predicted"}


def settings(**overrides) -> dict:
    base = {
        "split": "test",
        "n": N,
        "geometry": GEOMETRY,
        "dataset": "shapes",
        "dataset_fingerprint": "ab12" * 16,
        "model_hash": "cd34" * 16,
        "identity": IDENTITY,
        "rerun": "roar extract",
        "channels": False,
        "methods": METHODS,
        "provenance": {"roar_version": "0.1.0", "git_commit": "0123abcd"},
    }
    return {**base, **overrides}


def example_maps(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Maps whose magnitudes span 1e-20 to 1e4 across images, with all-zero images and exact zeros."""
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((n, *shape)).astype(np.float32)
    maps *= (10.0 ** rng.uniform(-20, 4, size=n)).reshape((n,) + (1,) * len(shape)).astype(np.float32)
    maps[::7] = 0
    maps[rng.random(maps.shape) < 0.05] = 0
    return maps


def assert_within_float16(got: np.ndarray, maps: np.ndarray) -> None:
    """Each value within 2^-11 of its image's largest magnitude; zeros exactly zero."""
    scale = np.abs(maps).reshape(len(maps), -1).max(axis=1).reshape((-1,) + (1,) * (maps.ndim - 1))
    assert got.dtype == np.float32 and got.shape == maps.shape
    assert np.all(np.abs(got - maps) <= scale * 2.0**-11)
    assert np.array_equal(got == 0, maps == 0)


def rows(start: int, stop: int) -> dict:
    r = np.arange(start, stop)
    return {"labels": r % 10, "predictions": (r * 3) % 10, "indices": r}


def write_all(writer: StoreWriter, data: dict[str, np.ndarray], only=None) -> None:
    """Every pending chunk of the given methods, as the extraction stage would write them."""
    step = writer.chunk_rows()
    names = list(only or data)
    for start in range(0, writer.n, step):
        stop = min(start + step, writer.n)
        todo = [m for m in names if any(a <= start < b for a, b in writer.pending(m))]
        if todo:
            writer.write(start, {m: data[m][start:stop] for m in todo}, **rows(start, stop))


def build(path: Path, data: dict[str, np.ndarray], **overrides) -> None:
    with StoreWriter(path, **settings(**overrides)) as writer:
        write_all(writer, data)
        writer.finish()


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    return {name: example_maps(N, GEOMETRY[1:], seed=i) for i, name in enumerate(METHODS)}


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "attributions" / "test.h5"


# ------------------------------------------------------------------------------------------- precision


def test_round_trip_within_float16_of_the_per_image_scale(path, data):
    build(path, data)
    with MapStore.open(path) as store:
        assert store.methods == list(METHODS)
        for name, maps in data.items():
            got = store.read(name)
            assert_within_float16(got, maps)
            assert np.array_equal(store.read(name, 10, 20), got[10:20])
        np.testing.assert_array_equal(store.labels, np.arange(N) % 10)
        np.testing.assert_array_equal(store.predictions, (np.arange(N) * 3) % 10)
        np.testing.assert_array_equal(store.indices, np.arange(N))


def test_tiny_squared_gradients_do_not_underflow(path):
    assert np.float16(1e-12) == 0  # what a plain float16 cast would store
    rng = np.random.default_rng(1)
    tiny = (rng.uniform(1e-6, 3e-6, size=(N, *GEOMETRY[1:])) ** 2).astype(np.float32)  # about 1e-12
    build(path, {"grad": tiny, "ig": tiny})
    with MapStore.open(path) as store:
        got = store.read("grad")
    assert np.all(got > 0)
    np.testing.assert_allclose(got, tiny, rtol=2.0**-10)


def test_compression_options_and_file_layout(tmp_path, data):
    for compression in ("lzf", "gzip", None):
        path = tmp_path / f"{compression}.h5"
        build(path, data, compression=compression)
        with h5py.File(path, "r") as f:
            ds = f["maps/ig"]
            assert ds.dtype == np.float16 and ds.shape == (N, *GEOMETRY[1:]) and ds.compression == compression
            assert f["scales/ig"].dtype == np.float32 and f["scales/ig"].shape == (N,)
            assert f.attrs["format"] == "roar-attributions" and f.attrs["format_version"] == FORMAT_VERSION == 2
            assert json.loads(f.attrs["geometry"]) == list(GEOMETRY)
            assert json.loads(f.attrs["provenance"])["git_commit"] == "0123abcd"
            assert json.loads(f.attrs["identity"]) == IDENTITY and f.attrs["rerun"] == "roar extract"
            assert json.loads(ds.attrs["identity"])["params"] == METHODS["ig"]["params"]
            assert json.loads(ds.attrs["identity"])["method"] == "integrated_gradients" and ds.attrs["rows_done"] == N
            assert "method" not in ds.attrs and "params" not in ds.attrs and "reduction" not in f.attrs
            assert all(f[key].dtype == np.int64 for key in ("labels", "predictions", "indices"))
        with MapStore.open(path) as store, MapStore.open(tmp_path / "lzf.h5") as first:
            np.testing.assert_array_equal(store.read("ig"), first.read("ig"))


# ---------------------------------------------------------------------------------------------- shapes


def test_channels_kept(path):
    maps = example_maps(N, GEOMETRY)
    build(path, {"grad": maps, "ig": maps}, channels=True)
    with MapStore.open(path) as store:
        assert store.channels
        assert_within_float16(store.read("grad"), maps)


def test_single_channel_maps_are_squeezed_when_channels_are_reduced(path):
    maps = example_maps(N, (1, *GEOMETRY[1:]))
    build(path, {"grad": maps, "ig": maps})
    with MapStore.open(path) as store:
        assert_within_float16(store.read("grad"), maps[:, 0])


def test_wrong_shape_names_method_and_shapes(path):
    with StoreWriter(path, **settings()) as writer, pytest.raises(RoarError) as err:
        writer.write(0, {"ig": np.zeros((64, 3, 64, 64), np.float32)}, **rows(0, 64))
    message = str(err.value)
    assert "'ig'" in message and "[64, 3, 64, 64]" in message and "[64, 64, 64]" in message


@pytest.mark.parametrize(
    ("geometry", "channels"),
    [((3, 32, 32), False), ((3, 32, 32), True), ((3, 224, 224), False), ((3, 224, 224), True), ((1, 16, 16), False)],
)
def test_chunks_are_256_kib_to_1_mib(geometry, channels):
    row = 2 * int(np.prod(geometry if channels else geometry[1:]))
    rows_per_chunk = chunk_rows_for(row, 10**6)
    assert 256 * 1024 <= rows_per_chunk * row <= 1024 * 1024 or (rows_per_chunk == 1 and row > 1024 * 1024)
    assert chunk_rows_for(row, 5) <= 5  # never more rows than the split has


def test_a_row_bigger_than_a_chunk_is_one_chunk_and_chunk_size_is_stored(path, data):
    assert chunk_rows_for(2 * 3 * 1024 * 1024, 100) == 1
    assert chunk_rows_for(1, 1) == 1 and CHUNK_BYTES // 2048 == 256  # 32x32 float16: 256 rows
    build(path, data)
    with h5py.File(path, "r") as f:
        assert f["maps/grad"].chunks == (64, 64, 64)


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_maps_are_refused_with_the_image_index_and_nothing_lands(path, data, bad):
    with StoreWriter(path, **settings()) as writer:
        writer.write(0, {m: data[m][:64] for m in METHODS}, **rows(0, 64))
        broken = data["ig"][64:128].copy()
        broken[5, 3, 4] = bad
        indices = np.arange(1000, 1064)  # positions in the split need not equal rows
        with pytest.raises(RoarError, match=r"method 'ig' produced (NaN|Inf) at image index 1005"):
            writer.write(
                64, {"grad": data["grad"][64:128], "ig": broken}, labels=indices, predictions=indices, indices=indices
            )
        assert writer.pending("grad") == writer.pending("ig") == [(64, N)]
    with MapStore.open(path, require_complete=False) as store:
        assert store.method_info("grad")["rows_done"] == 64
        assert np.isnan(store.read("grad", 64, 128)).all() and (store.indices[64:128] == -1).all()


def test_unfinished_store_is_refused_then_readable_on_request(path, data):
    with StoreWriter(path, **settings()) as writer:
        writer.write(0, {"ig": data["ig"][:128]}, **rows(0, 128))
        writer.write(0, {"grad": data["grad"][:64]}, **rows(0, 64))
        writer.finish()  # incomplete: stays unfinished
    with pytest.raises(RoarError) as err:
        MapStore.open(path)
    message = str(err.value)
    assert "is unfinished" in message and "ig: 128 of 300 images" in message and "grad: 64 of 300 images" in message
    assert message.endswith("; rerun roar extract to complete it")
    with MapStore.open(path, require_complete=False) as store:
        assert store.method_info("ig") == {
            "method": "integrated_gradients",
            "params": METHODS["ig"]["params"],
            "rows_done": 128,
            "n": N,
            "complete": False,
        }
        got = store.read("ig")
        assert_within_float16(got[:128], data["ig"][:128])
        assert np.isnan(got[128:]).all()
        assert [start for start, _ in store.read_chunks("ig")] == [0, 64]


def test_missing_store(tmp_path):
    expected = r"no store at .*nothing.h5; run the stage that writes it first"
    with pytest.raises(RoarError, match=expected):
        MapStore.open(tmp_path / "nothing.h5")
    with pytest.raises(RoarError, match=r"no store at .*nothing.h5; run roar vog first"):
        MapStore.open(tmp_path / "nothing.h5", rerun="roar vog")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"split": "train"}, "split 'test', this run asks for 'train'"),
        ({"n": N + 1}, f"{N} images, this dataset split has {N + 1}"),
        ({"geometry": (3, 32, 32)}, "geometry 3x64x64, this dataset is 3x32x32"),
        ({"dataset_fingerprint": "ef56" * 16}, "dataset fingerprint ab12ab12ab12..., this dataset is ef56ef56ef56..."),
        ({"model_hash": "9999" * 16}, "model cd34cd34cd34..., this model is 999999999999..."),
        ({"identity": {**IDENTITY, "reduction": "abs"}}, "reduction 'sum_squares', this run asks for 'abs'"),
        ({"identity": {**IDENTITY, "target": "label"}}, "target 'predicted', this run asks for 'label'"),
        ({"identity": {"reduction": "sum_squares"}}, "target 'predicted', this run does not set it"),
        ({"identity": {**IDENTITY, "fill": "mean"}}, "without fill, this run asks for fill 'mean'"),
        ({"channels": True}, "channels reduced, this run asks for channels kept"),
    ],
)
@pytest.mark.parametrize("finished", [True, False])
def test_resuming_with_other_inputs_names_the_first_difference(path, data, change, words, finished):
    with StoreWriter(path, **settings()) as writer:
        write_all(writer, data, only=["grad", "ig"] if finished else ["grad"])
        writer.finish()
    with pytest.raises(RoarError) as err:
        StoreWriter(path, **settings(**change))
    message = str(err.value)
    assert words in message and "delete it or use another output_dir" in message
    assert str(path if finished else staging_path(path)) in message


def test_other_params_for_a_stored_method_name_the_method_and_param(path, data):
    build(path, data)
    methods = {**METHODS, "ig": {"method": "integrated_gradients", "params": {"steps": 32, "baseline": "zeros"}}}
    with pytest.raises(RoarError, match=r"method 'ig' was computed with steps=50, this run asks for steps=32"):
        StoreWriter(path, **settings(methods=methods))
    methods = {**METHODS, "grad": {"method": "guided_backprop", "params": {}}}
    with pytest.raises(RoarError, match=r"method 'grad' was computed by 'gradient'"):
        StoreWriter(path, **settings(methods=methods))


def test_validate_for_names_the_first_mismatch(path, data):
    build(path, data)
    good = {"dataset": "shapes", "split": "test", "n": N, "geometry": GEOMETRY, "dataset_fingerprint": "ab12" * 16}
    with MapStore.open(path) as store:
        store.validate_for(**good)
        for change, words in [
            ({"split": "train"}, "store is for split 'test', asked for 'train'"),
            ({"n": 2000}, f"store holds {N} images, the dataset split has 2000"),
            ({"geometry": (3, 32, 32)}, "geometry is 3x64x64, the dataset's is 3x32x32"),
            ({"dataset_fingerprint": "ef56" * 16}, "fingerprint ab12ab12ab12..., this dataset is ef56ef56ef56..."),
        ]:
            with pytest.raises(RoarError, match=words.replace(".", r"\.").replace("(", r"\(")):
                store.validate_for(**{**good, **change})


def test_unknown_method_suggests_a_name(path, data):
    build(path, data)
    with MapStore.open(path) as store, pytest.raises(RoarError, match=r"no method 'igg'.*did you mean 'ig'"):
        store.read("igg")


def test_second_writer_on_the_same_store_is_refused(path):
    with StoreWriter(path, **settings()), pytest.raises(RoarError, match=r"another process \(pid \d+ .*\) is writing"):
        StoreWriter(path, **settings())


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_damaged_file_is_a_clear_error(path, data, damage):
    build(path, data)
    if damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(50_000))
    else:
        os.truncate(path, path.stat().st_size // 2)
    for action in (
        lambda: StoreWriter(path, **settings()),
        lambda: MapStore.open(path).read("ig"),
        lambda: describe(path),
    ):
        with pytest.raises(RoarError) as err:
            action()
        assert str(path) in str(err.value) and "delete it" in str(err.value)


def test_damaged_staging_manifest_is_a_clear_error(path, data):
    with StoreWriter(path, **settings()) as writer:
        write_all(writer, data, only=["grad"])
    (staging_path(path) / "store.json").write_text("{not json")
    for action in (lambda: StoreWriter(path, **settings()), lambda: MapStore.open(path)):
        with pytest.raises(RoarError, match=r"store.json is damaged .*; delete .*test.h5.staging"):
            action()


def test_a_corrupted_staged_chunk_is_removed_and_recomputed(path, data):
    with StoreWriter(path, **settings()) as writer:
        write_all(writer, data)
        (staging_path(path) / "maps" / "ig" / f"{128:012d}.npz").write_bytes(b"garbage")
        with pytest.raises(RoarError, match=r"ig/000000000128.npz was unreadable and has been removed; rerun"):
            writer.finish()
    with StoreWriter(path, **settings()) as writer:
        assert writer.pending("ig") == [(128, 192)] and writer.pending("grad") == []
        write_all(writer, data)
        writer.finish()
    with MapStore.open(path) as store:
        assert_within_float16(store.read("ig"), data["ig"])


def test_rows_of_another_dataset_order_are_refused_before_anything_lands(path, data):
    with StoreWriter(path, **settings()) as writer:
        writer.write(64, {"grad": data["grad"][64:128]}, **rows(64, 128))
        shuffled = {key: value[::-1].copy() for key, value in rows(0, 128).items()}
        with pytest.raises(RoarError, match=r"rows 64-128 were stored with other indices; the dataset or its order"):
            writer.write(0, {m: data[m][:128] for m in METHODS}, **shuffled)
        assert writer.pending("ig") == [(0, N)] and writer.pending("grad") == [(0, 64), (128, N)]


# ------------------------------------------------------------------------------------------- resuming


def test_resume_writes_only_the_missing_chunks_and_matches_an_uninterrupted_run(tmp_path, data):
    whole = tmp_path / "whole.h5"
    build(whole, data)
    resumed = tmp_path / "resumed.h5"
    with StoreWriter(resumed, **settings()) as writer:
        writer.write(0, {"grad": data["grad"][:128], "ig": data["ig"][:128]}, **rows(0, 128))
        writer.write(192, {"ig": data["ig"][192:256]}, **rows(192, 256))
    with StoreWriter(resumed, **settings()) as writer:
        assert writer.pending("grad") == [(128, N)]
        assert writer.pending("ig") == [(128, 192), (256, N)]
        write_all(writer, data)
        writer.finish()
    assert not staging_path(resumed).exists()
    with h5py.File(whole, "r") as a, h5py.File(resumed, "r") as b:
        for key in ("maps/grad", "maps/ig", "scales/grad", "scales/ig", "labels", "indices"):
            assert np.array_equal(a[key][:], b[key][:]), key


def test_a_finished_store_gains_a_method(path, data):
    build(path, data)
    with h5py.File(path, "r") as f:
        before = f["maps/ig"][:]
    extra = {**METHODS, "sg": {"method": "smoothgrad", "params": {"n": 25}}}
    with StoreWriter(path, **settings(methods=extra)) as writer:
        assert writer.pending("ig") == [] and writer.pending("sg") == [(0, N)]
        write_all(writer, {"sg": example_maps(N, GEOMETRY[1:], seed=9)})
        with pytest.raises(RoarError, match="unfinished \\(sg: 300 of 300 images, not yet consolidated"):
            MapStore.open(path)  # staged, not yet consolidated
        writer.finish()
    with MapStore.open(path) as store:
        assert store.methods == ["grad", "ig", "sg"]
        assert store.method_info("sg")["complete"]
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["maps/ig"][:], before)


def test_the_content_digest_follows_the_stored_values_and_survives_extension(tmp_path, data):
    """What results record as the identity of the maps they read: equal for equal values, different
    when any value differs, kept when the store gains a set, and the same when computed from a file
    written before digests were recorded."""
    first, second, changed = (tmp_path / name / "test.h5" for name in ("a", "b", "c"))
    build(first, data)
    build(second, data)
    altered = {**data, "ig": data["ig"].copy()}
    altered["ig"][N - 1, 5, 5] = 1234.5
    build(changed, altered)
    with MapStore.open(first) as a, MapStore.open(second) as b, MapStore.open(changed) as c:
        digests = {name: a.digest(name) for name in METHODS}
        assert all(len(d) == 16 for d in digests.values()) and digests["grad"] != digests["ig"]
        assert {name: b.digest(name) for name in METHODS} == digests
        assert c.digest("grad") == digests["grad"] and c.digest("ig") != digests["ig"]

    extra = {**METHODS, "sg": {"method": "smoothgrad", "params": {"n": 25}}}
    with StoreWriter(first, **settings(methods=extra)) as writer:
        write_all(writer, {"sg": example_maps(N, GEOMETRY[1:], seed=9)})
        with MapStore.open(first, require_complete=False) as partial, pytest.raises(RoarError, match="unfinished"):
            partial.digest("sg")
        writer.finish()
    with MapStore.open(first) as store:
        assert {name: store.digest(name) for name in METHODS} == digests

    with h5py.File(second, "r+") as f:  # as written before digests were recorded
        for name in METHODS:
            del f["maps"][name].attrs["digest"]
    with MapStore.open(second) as store:
        assert {name: store.digest(name) for name in METHODS} == digests


def test_partial_maps_of_a_method_no_longer_requested_are_dropped(path, data):
    with StoreWriter(path, **settings()) as writer:
        writer.write(0, {"ig": data["ig"][:64]}, **rows(0, 64))
    with StoreWriter(path, **settings(methods={"grad": METHODS["grad"]})) as writer:
        assert writer.methods.keys() == {"grad"}
        write_all(writer, data, only=["grad"])
        writer.finish()
    with MapStore.open(path) as store:
        assert store.methods == ["grad"]


def test_describe_reports_methods_and_completeness(path, data):
    with StoreWriter(path, **settings()) as writer:
        write_all(writer, data, only=["grad"])
    text = describe(path)
    assert "UNFINISHED" in text and "grad: gradient {}, 300 / 300 images" in text and "ig: integrated_gradients" in text
    assert "0 / 300 images, UNFINISHED" in text and "ab12" * 16 in text and "3x64x64" in text
    build(path, data)
    text = describe(path)
    assert text.splitlines()[0].endswith(": complete") and "UNFINISHED" not in text
    for words in ('"steps": 50', "300 / 300 images, complete", "split       test", "cd34" * 16, "git 0123abcd", "MiB"):
        assert words in text


# ------------------------------------------------------------------------------ identities and rerun hints


SNAPSHOTS = {"epoch_0001": {"epoch": 1, "step": 10}, "epoch_0002": {"epoch": 2, "step": 20}}
VOG = {"identity": {"content": "vog_input_gradient"}, "methods": SNAPSHOTS, "rerun": "roar vog"}


def test_array_sets_of_any_identity_are_stored_and_checked_key_by_key(path):
    maps = {name: example_maps(N, GEOMETRY[1:], seed=i) for i, name in enumerate(SNAPSHOTS)}
    build(path, maps, **VOG)
    with MapStore.open(path) as store:
        assert store.identity == {"content": "vog_input_gradient"} and store.rerun == "roar vog"
        assert store.identity_of("epoch_0002") == {"epoch": 2, "step": 20}
        assert store.method_info("epoch_0002") == {"epoch": 2, "step": 20, "rows_done": N, "n": N, "complete": True}
        assert_within_float16(store.read("epoch_0002"), maps["epoch_0002"])
    moved = {**SNAPSHOTS, "epoch_0002": {"epoch": 2, "step": 21}}
    with pytest.raises(RoarError, match=r"method 'epoch_0002' was computed with step=20, this run asks for step=21; "):
        StoreWriter(path, **settings(**{**VOG, "methods": moved}))
    extra = {**SNAPSHOTS, "epoch_0002": {"epoch": 2, "step": 20, "seed": 3}}
    with pytest.raises(RoarError, match=r"computed with seed=<unset>, this run asks for seed=3; delete it or store"):
        StoreWriter(path, **settings(**{**VOG, "methods": extra}))
    with pytest.raises(RoarError, match=r"was made for content 'vog_input_gradient', this run asks for 'other'"):
        StoreWriter(path, **settings(**{**VOG, "identity": {"content": "other"}}))
    with pytest.raises(ValueError, match="reserved key"):
        StoreWriter(path, **settings(methods={"a": {"rows_done": 3}}))
    text = describe(path)
    assert "content     vog_input_gradient" in text and "epoch_0001: epoch=1 step=10, 300 / 300 images" in text


def test_the_rerun_hint_is_kept_in_the_file_for_readers(tmp_path, data):
    path = tmp_path / "hinted.h5"
    with StoreWriter(path, **settings(rerun="roar vog")) as writer:
        write_all(writer, data, only=["grad"])
    with pytest.raises(RoarError, match=r"is unfinished .*; rerun roar vog to complete it$"):
        MapStore.open(path)  # staged only: the hint comes from the manifest
    with pytest.raises(RoarError, match=r"; rerun roar extract to complete it$"):
        MapStore.open(path, rerun="roar extract")  # the caller knows best
    build(path, data, rerun="roar vog")
    good = {"dataset": "shapes", "split": "test", "n": N, "geometry": GEOMETRY, "dataset_fingerprint": "ab12" * 16}
    with MapStore.open(path) as store, pytest.raises(RoarError, match="; rerun roar vog for this dataset"):
        store.validate_for(**{**good, "split": "train"})
    assert "rerun       roar vog" in describe(path)
    plain = tmp_path / "plain.h5"
    with StoreWriter(plain, **settings(rerun=None)) as writer:
        write_all(writer, data, only=["grad"])
    with pytest.raises(RoarError, match=r"; rerun the stage that wrote it to complete it$"):
        MapStore.open(plain)


# -------------------------------------------------------------------------------- files of format version 1


def to_version_1(path: Path) -> None:
    """Rewrite a store's attributes as format version 1 had them (the store of attribution maps only)."""
    with h5py.File(path, "r+") as f:
        identity = json.loads(f.attrs["identity"])
        for key in ("identity", "rerun"):
            del f.attrs[key]
        f.attrs["format_version"] = 1
        f.attrs["reduction"], f.attrs["target"] = identity["reduction"], identity["target"]
        for ds in f["maps"].values():
            spec = json.loads(ds.attrs["identity"])
            del ds.attrs["identity"]
            ds.attrs["method"], ds.attrs["params"] = spec["method"], json.dumps(spec["params"], sort_keys=True)


def manifest_to_version_1(path: Path) -> None:
    manifest_path = staging_path(path) / "store.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(manifest.pop("identity"), format_version=1)
    del manifest["rerun"]
    manifest_path.write_text(json.dumps(manifest))


def test_a_version_1_file_reads_the_same_and_is_extended_in_place_of_itself(tmp_path, data):
    new, old = tmp_path / "new.h5", tmp_path / "old.h5"
    build(new, data)
    build(old, data)
    to_version_1(old)
    with h5py.File(old, "r") as f:
        assert f.attrs["format_version"] == 1 and f["maps/ig"].attrs["method"] == "integrated_gradients"
    with MapStore.open(new) as a, MapStore.open(old) as b:
        assert b.methods == a.methods and b.identity == a.identity == IDENTITY and b.rerun is None
        for name in METHODS:
            assert np.array_equal(a.read(name), b.read(name)) and a.method_info(name) == b.method_info(name)
        assert all(np.array_equal(getattr(a, key), getattr(b, key)) for key in ("labels", "predictions", "indices"))
    text = describe(old)
    assert "grad: gradient {}, 300 / 300 images, complete" in text and "reduction   sum_squares" in text
    with pytest.raises(RoarError, match="reduction 'sum_squares', this run asks for 'abs'"):
        StoreWriter(old, **settings(identity={**IDENTITY, "reduction": "abs"}))
    with pytest.raises(RoarError, match="method 'ig' was computed with steps=50, this run asks for steps=32"):
        StoreWriter(old, **settings(methods={"ig": {**METHODS["ig"], "params": {"steps": 32, "baseline": "zeros"}}}))
    extra = {**METHODS, "sg": {"method": "smoothgrad", "params": {"n": 25}}}
    sg = {"sg": example_maps(N, GEOMETRY[1:], seed=9)}
    for path in (new, old):
        with StoreWriter(path, **settings(methods=extra)) as writer:
            assert writer.pending("ig") == [] and writer.pending("sg") == [(0, N)]
            write_all(writer, sg)
            writer.finish()
    with h5py.File(new, "r") as a, h5py.File(old, "r") as b:
        assert b.attrs["format_version"] == FORMAT_VERSION and "reduction" not in b.attrs
        assert dict(a.attrs) == dict(b.attrs)
        for name in extra:
            assert dict(a["maps"][name].attrs) == dict(b["maps"][name].attrs)
            for group in ("maps", "scales"):
                assert np.array_equal(a[group][name][:].view(np.uint8), b[group][name][:].view(np.uint8))


def test_a_version_1_staging_folder_resumes(tmp_path, data):
    whole, resumed = tmp_path / "whole.h5", tmp_path / "resumed.h5"
    build(whole, data)
    with StoreWriter(resumed, **settings()) as writer:
        write_all(writer, data, only=["grad"])
    manifest_to_version_1(resumed)
    with MapStore.open(resumed, require_complete=False) as store:
        assert store.identity == IDENTITY and store.method_info("grad")["rows_done"] == N
    with StoreWriter(resumed, **settings()) as writer:
        assert writer.pending("grad") == [] and writer.pending("ig") == [(0, N)]
        write_all(writer, data)
        writer.finish()
    with h5py.File(whole, "r") as a, h5py.File(resumed, "r") as b:
        for key in ("maps/grad", "maps/ig", "scales/grad", "scales/ig", "labels", "indices"):
            assert np.array_equal(a[key][:], b[key][:]), key


# ----------------------------------------------------------------------------------------------- SIGKILL


def _stress_module():
    spec = importlib.util.spec_from_file_location("store_stress", Path(__file__).with_name("store_stress.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["store_stress"] = module  # the forked writers find their entry point by module name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_is_bit_identical(tmp_path, monkeypatch):
    """Five stores, each killed once while written and once while gaining a method, then resumed.

    The kills land before evenly spread file operations of the writer (staging a chunk, writing the
    consolidated file, renaming it, cleaning up). ``python tests/store_stress.py --trials 30`` kills
    at random times instead, and ``--sweep`` before every single file operation.
    """
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    stress = _stress_module()
    stress.preload()
    stats = stress.stress(tmp_path, trials=5, kills=1, seed=None, n=192, mode="event", log=lambda _: None)
    assert not stats.failures, "\n".join(stats.failures)
    assert stats.kills == 10 and stats.resumes == 10 and stats.identical == 5
    assert {"staging chunks", "consolidating", "adding a method"} <= set(stats.phases), stats.phases


# ------------------------------------------------------------------------------------------- extra row arrays

EXTRAS = {"top": ("int64", (3,)), "score": ("float32", ()), "flags": ("bool", (2,))}


def extra_rows(start: int, stop: int) -> dict:
    r = np.arange(start, stop)
    return {
        "top": np.stack([r, r + 1, r + 2], axis=1),
        "score": (r / 7).astype(np.float32),
        "flags": np.stack([r % 2 == 0, r % 3 == 0], axis=1),
    }


def test_extra_row_arrays_survive_a_restart_and_consolidation(path, data):
    """Extras are staged with the rows of each chunk: a writer stopped half-way and resumed ends with
    exactly the arrays of every row, readable from the staging folder before and the file after."""
    step = None
    with StoreWriter(path, **settings(extras=EXTRAS)) as writer:
        step = writer.chunk_rows()
        stop = min(step, N)
        writer.write(0, {m: data[m][:stop] for m in METHODS}, **rows(0, stop), extras=extra_rows(0, stop))
    partial = MapStore.open(path, require_complete=False)
    assert sorted(partial.extras) == sorted(EXTRAS)
    np.testing.assert_array_equal(partial.extra("top")[:stop], extra_rows(0, stop)["top"])
    assert np.isnan(partial.extra("score")[stop:]).all()
    partial.close()
    with StoreWriter(path, **settings(extras=EXTRAS)) as writer:
        for start in range(stop, N, step):
            end = min(start + step, N)
            writer.write(
                start, {m: data[m][start:end] for m in METHODS}, **rows(start, end), extras=extra_rows(start, end)
            )
        writer.finish()
    with MapStore.open(path) as store:
        expected = extra_rows(0, N)
        for name in EXTRAS:
            got = store.extra(name)
            assert got.dtype == np.dtype(EXTRAS[name][0])
            np.testing.assert_array_equal(got, expected[name])
        with pytest.raises(RoarError, match="no extra row array 'topp'"):
            store.extra("topp")


def test_extra_row_arrays_are_part_of_the_identity_and_checked_on_write(path, data):
    with StoreWriter(path, **settings(extras=EXTRAS)) as writer:
        k = writer.chunk_rows()
        with pytest.raises(ValueError, match="must give the extra row arrays"):
            writer.write(0, {m: data[m][:k] for m in METHODS}, **rows(0, k))
        bad = extra_rows(0, k)
        bad["top"] = bad["top"][:, :2]
        with pytest.raises(ValueError, match=r"'top' has shape"):
            writer.write(
                0, {m: data[m][: writer.chunk_rows()] for m in METHODS}, **rows(0, writer.chunk_rows()), extras=bad
            )
    with pytest.raises(RoarError, match="extras"):
        StoreWriter(path, **settings(extras={"top": ("int64", (5,))}))
    with pytest.raises(ValueError, match="dtype"):
        StoreWriter(path.with_name("other.h5"), **settings(extras={"top": ("int8", (5,))}))
