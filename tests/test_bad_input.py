"""Bad input ends in one line ``error: <message>`` on stderr and exit status 2, never a traceback.

Each case of the table builds its bad input in ``tmp_path``, runs the command line in-process
(``roar.cli.main``) and names the parts the one line must contain: the file or key at fault and
what to do. Every case is refused before any real work (or after one tiny epoch).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from roar.cli import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def sets(*assignments: str) -> list[str]:
    return [arg for assignment in assignments for arg in ("--set", assignment)]


def tiny(command: str, tmp: Path, *assignments: str) -> list[str]:
    """``command`` on the smoke config, shrunk to a few images and no training, writing in ``tmp``."""
    base = [f"output_dir={tmp / 'run'}", "dataset.train_size=20", "dataset.test_size=10", "model.widths=[4,4,4]"]
    return [command, "--config", str(SMOKE), *sets(*base, "training.epochs=0", *assignments)]


def config_file(tmp: Path, content: bytes) -> Path:
    path = tmp / "bad.yaml"
    path.write_bytes(content)
    return path


def a_file(tmp: Path) -> Path:
    path = tmp / "not-a-folder"
    path.write_text("a file where a folder belongs\n")
    return path


def read_only_folder(tmp: Path, monkeypatch) -> Path:
    """An empty folder nobody may write in. Permission bits do not bind root, so under root the
    kernel's answer for everyone else (not writable) is given for it."""
    folder = tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        real = os.access

        def access(path, mode, *args, **kwargs):
            inside = Path(path).resolve().is_relative_to(folder.resolve())
            return False if inside and mode & os.W_OK else real(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    return folder


def image_folder(tmp: Path, bad: dict[str, bytes]) -> Path:
    """<tmp>/images/{train,val}/{a,b}/*.png, 12×12, plus the files ``bad`` (relative path → bytes)."""
    root = tmp / "images"
    for split in ("train", "val"):
        for c, label in enumerate("ab"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 12), (80 * c, 40 * i, 200)).save(folder / f"{i}.png")
    for name, content in bad.items():
        (root / name).write_bytes(content)
    return root


def truncated_png() -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    Image.fromarray(np.arange(3 * 64 * 64, dtype=np.uint8).reshape(64, 64, 3)).save(buffer, format="png")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def train_on_folder(tmp: Path, workers: int, bad: dict[str, bytes]) -> list[str]:
    root = image_folder(tmp, bad)
    dataset = f"dataset={{name: folder, root: {root}, resize: 8, crop: 8}}"
    batches = ["training.epochs=1", "training.batch_size=4", "training.eval_batch_size=4"]
    return tiny("train", tmp, dataset, *batches, f"training.num_workers={workers}")


@dataclass
class Case:
    name: str
    argv: Callable[..., list[str]]  # (tmp_path, monkeypatch) -> the command line
    expect: Callable[[Path], list[str]]  # tmp_path -> the parts the error line must contain


CASES = [
    # 1. a config file that is not UTF-8
    Case(
        "config_not_utf8",
        lambda tmp, mp: ["config", "--config", str(config_file(tmp, "seed: 1\nname: café\n".encode("latin-1")))],
        lambda tmp: [f"{tmp / 'bad.yaml'}: not UTF-8 text", "byte 0xe9 on line 2", "save it with UTF-8 encoding"],
    ),
    # 2. a key given twice, at any depth, in the file or in an override
    Case(
        "duplicate_top_level_key",
        lambda tmp, mp: ["config", "--config", str(config_file(tmp, b"seed: 1\nname: x\nseed: 2\n"))],
        lambda tmp: [str(tmp / "bad.yaml"), "duplicate key 'seed' (lines 1 and 3)", "give each key once"],
    ),
    Case(
        "duplicate_nested_key",
        lambda tmp, mp: [
            "config",
            "--config",
            str(config_file(tmp, b"training:\n  epochs: 1\n  schedule:\n    name: step\n  epochs: 2\n")),
        ],
        lambda tmp: ["duplicate key 'training.epochs' (lines 2 and 5)"],
    ),
    Case(
        "duplicate_key_in_a_list_item",
        lambda tmp, mp: [
            "config",
            "--config",
            str(
                config_file(
                    tmp, b"attribution:\n  methods:\n    - gradient\n    - {name: smoothgrad, samples: 2, samples: 3}\n"
                )
            ),
        ],
        lambda tmp: ["duplicate key 'attribution.methods[1].samples' (twice on line 4)"],
    ),
    Case(
        "duplicate_key_in_an_override",
        lambda tmp, mp: ["config", "--config", str(SMOKE), *sets("dataset={name: shapes, seed: 1, seed: 2}")],
        lambda tmp: ["--set 'dataset={name: shapes, seed: 1, seed: 2}'", "duplicate key 'dataset.seed'"],
    ),
    # 3. seeds outside the one range every consumer accepts
    Case(
        "negative_dataset_seed",
        lambda tmp, mp: ["config", "--config", str(SMOKE), *sets("dataset.seed=-1")],
        lambda tmp: ["dataset.seed: a seed must be an integer from 0 to 4294967295 (2**32 - 1), got -1"],
    ),
    Case(
        "huge_run_seed",
        lambda tmp, mp: ["config", "--config", str(SMOKE), *sets("seed=99999999999999999999999")],
        lambda tmp: [": seed: a seed must be an integer from 0 to 4294967295", "got 99999999999999999999999"],
    ),
    Case(
        "cifar10_seed_past_2_32",
        lambda tmp, mp: ["config", "--config", str(SMOKE), *sets("dataset={name: cifar10, seed: 4294967296}")],
        lambda tmp: ["dataset.seed: a seed must be an integer from 0 to 4294967295"],
    ),
    Case(
        "vog_toy_negative_seed",
        lambda tmp, mp: ["vog-toy", "--seed", "-1", "--epochs", "1", "--out", str(tmp / "toy")],
        lambda tmp: ["--seed -1: a seed must be an integer from 0 to 4294967295"],
    ),
    # 5. a dataset root that is a file, or a cache folder nobody may write in
    Case(
        "shapes_root_is_a_file",
        lambda tmp, mp: tiny("train", tmp, f"dataset.root={a_file(tmp)}"),
        lambda tmp: ["dataset.root", f"{tmp / 'not-a-folder'} is a file, not a folder", "dataset.cache=false"],
    ),
    Case(
        "shapes_root_is_read_only",
        lambda tmp, mp: tiny("train", tmp, f"dataset.root={read_only_folder(tmp, mp)}"),
        lambda tmp: ["dataset.root", str(tmp / "read-only"), "not writable", "dataset.cache=false"],
    ),
    Case(
        "folder_root_is_a_file",
        lambda tmp, mp: tiny("train", tmp, f"dataset={{name: folder, root: {a_file(tmp)}}}"),
        lambda tmp: [f"dataset.root {tmp / 'not-a-folder'} is a file, not a folder", "train/<class>/*.jpg"],
    ),
    Case(
        "imagenet_root_is_a_file",
        lambda tmp, mp: tiny("train", tmp, f"dataset={{name: imagenet, root: {a_file(tmp)}}}"),
        lambda tmp: [f"dataset.root {tmp / 'not-a-folder'} is a file, not a folder"],
    ),
    Case(
        "cifar10_root_is_a_file",
        lambda tmp, mp: tiny("train", tmp, f"dataset={{name: cifar10, root: {a_file(tmp)}}}"),
        lambda tmp: [f"dataset.root {tmp / 'not-a-folder'} is a file, not a folder"],
    ),
    Case(
        "cifar10_download_below_a_file",
        lambda tmp, mp: tiny("train", tmp, f"dataset={{name: cifar10, root: {a_file(tmp) / 'data'}, download: true}}"),
        lambda tmp: ["dataset.root", f"{tmp / 'not-a-folder'} is a file, not a folder", "writable folder"],
    ),
    # 6. a damaged image, read by a DataLoader worker or by the main process
    Case(
        "unidentifiable_image_in_a_worker",
        lambda tmp, mp: train_on_folder(tmp, 1, {"train/a/bad.png": b"not an image"}),
        lambda tmp: [f"cannot read image {tmp / 'images/train/a/bad.png'}", "replace or remove the file"],
    ),
    Case(
        "truncated_image_in_a_worker",
        lambda tmp, mp: train_on_folder(tmp, 2, {"train/b/cut.png": truncated_png()}),
        lambda tmp: [f"cannot read image {tmp / 'images/train/b/cut.png'}", "truncated", "replace or remove"],
    ),
    Case(
        "truncated_image_in_the_main_process",
        lambda tmp, mp: train_on_folder(tmp, 0, {"val/a/cut.png": truncated_png()}),
        lambda tmp: [f"cannot read image {tmp / 'images/val/a/cut.png'}", "truncated", "replace or remove"],
    ),
    # 7. a shard value that starts with a dash, given as a separate argument
    Case(
        "negative_shard_as_its_own_argument",
        lambda tmp, mp: ["retrain", "--config", str(SMOKE), *sets(f"output_dir={tmp / 'run'}"), "--shard", "-1/2"],
        lambda tmp: ["--shard '-1/2': need 0 <= i < n"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_error_line_and_exit_status_2(case, tmp_path, monkeypatch, capsys):
    argv = case.argv(tmp_path, monkeypatch)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for part in case.expect(tmp_path):
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"


def test_both_spellings_of_a_shard_give_the_same_line(tmp_path, capsys):
    common = ["retrain", "--config", str(SMOKE), *sets(f"output_dir={tmp_path}")]
    assert main([*common, "--shard=-1/2"]) == 2
    joined = capsys.readouterr().err
    assert main([*common, "--shard", "-1/2"]) == 2
    assert capsys.readouterr().err == joined


@pytest.mark.parametrize("batch_size", [64, 4], ids=["one_step", "warm_up_of_one_step"])
def test_a_short_onecycle_run_trains(batch_size, tmp_path, data_root, capsys):
    """Onecycle over one step (20 images, batches of 64), or over five with a warm-up of exactly one
    (batches of 4, 0.2 × 5), where OneCycleLR alone would divide by zero: the run trains and reports."""
    argv = tiny(
        "train",
        tmp_path,
        f"dataset.root={data_root}",
        "training.epochs=1",
        f"training.batch_size={batch_size}",
        "training.schedule={name: onecycle, warmup_fraction: 0.2}",
    )
    assert main(argv) == 0
    assert "trained resnet8 on shapes" in capsys.readouterr().out
