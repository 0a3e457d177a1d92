"""The command line: exit codes, one-line errors, summaries; the Taskfile passes arguments on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


def roar(*args, cwd):
    return subprocess.run([sys.executable, "-m", "roar", *args], cwd=cwd, capture_output=True, text=True)


def test_misspelt_key_exits_2_with_one_line_naming_it(repo):
    result = roar("train", "--set", "training.epocs=3", cwd=repo)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "training.epocs" in lines[0] and "did you mean 'epochs'" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(repo, tmp_path):
    result = roar("train", "--config", str(tmp_path / "nope.yaml"), cwd=repo)
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_config_prints_the_resolved_config(repo):
    result = roar("config", "--config", "configs/smoke.yaml", "--set", "training.epochs=5", cwd=repo)
    assert result.returncode == 0
    assert "epochs: 5" in result.stdout and result.stdout.strip().endswith("is valid")


def test_list_names_the_registries(repo):
    result = roar("list", cwd=repo)
    assert result.returncode == 0 and "shapes" in result.stdout and "resnet8" in result.stdout


def test_train_prints_a_one_line_summary(repo, tiny_overrides):
    sets = [x for a in [*tiny_overrides, "training.epochs=1"] for x in ("--set", a)]
    result = roar("train", "--config", "configs/smoke.yaml", *sets, cwd=repo)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trained resnet8 on shapes: test accuracy")


@pytest.fixture
def task_bin():
    path = shutil.which("task") or os.path.join(os.path.dirname(sys.executable), "task")
    assert os.path.exists(path), "the task runner (go-task-bin) is a dev dependency"
    return path


def test_taskfile_lists_the_stages_and_passes_arguments(repo, task_bin):
    env = {**os.environ, "NO_COLOR": "1"}  # CI=true makes task colour its output otherwise
    listing = subprocess.run([task_bin, "--list"], cwd=repo, capture_output=True, text=True, env=env)
    for name in ["train-cls", "demo", "test", "lint", "build-docker", "bash-docker", "docker"]:
        assert f"* {name}:" in listing.stdout
    dry = subprocess.run(
        [task_bin, "--dry", "train-cls", "CONFIG=configs/smoke.yaml", "--", "--set", "training.epochs=3"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
    )
    assert "train --config configs/smoke.yaml --set 'training.epochs=3'" in dry.stderr + dry.stdout


def test_the_seeds_names_stay_as_aliases(repo, task_bin):
    from roar.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["lerf"]).func is parser.parse_args(["curves"]).func
    assert parser.parse_args(["evaluate", "--mode", "kar"]).func is parser.parse_args(["retrain"]).func
    env = {**os.environ, "NO_COLOR": "1"}
    for task, command in (("lerf", "curves"), ("evaluate-roar", "retrain --mode roar"), ("demo", "curves")):
        dry = subprocess.run([task_bin, "--dry", task], cwd=repo, capture_output=True, text=True, env=env)
        assert dry.returncode == 0 and f"-m roar {command} --config" in dry.stderr + dry.stdout, task


def test_list_names_every_registry(repo):
    lines = roar("list", cwd=repo).stdout.splitlines()
    kinds = {line.split(":")[0]: line.split(": ")[1].split(", ") for line in lines}
    assert set(kinds) == {"datasets", "models", "methods", "fills", "metrics"}
    assert {"noise_tunnel", "ig_vargrad"} <= set(kinds["methods"]) and "patch_mean" in kinds["fills"]
    assert "accuracy" in kinds["metrics"]


@pytest.mark.parametrize(
    "task, expected",
    [
        ("train-cls", "-m roar train --config configs/demo.yaml --nproc 4"),
        ("extract-attribution-maps", "-m torch.distributed.run --standalone --nproc_per_node 4 -m roar extract"),
        ("evaluate-roar", "-m roar retrain --mode roar --config configs/demo.yaml --set retrain.jobs=4"),
        ("evaluate-kar", "-m roar retrain --mode kar --config configs/demo.yaml --set retrain.jobs=4"),
    ],
)
def test_nproc_spreads_a_task_over_processes(repo, task_bin, task, expected):
    env = {**os.environ, "NO_COLOR": "1"}
    many = subprocess.run([task_bin, "--dry", task, "NPROC=4"], cwd=repo, capture_output=True, text=True, env=env)
    assert many.returncode == 0 and expected in many.stderr + many.stdout
    one = subprocess.run([task_bin, "--dry", task], cwd=repo, capture_output=True, text=True, env=env)
    assert "nproc" not in one.stderr + one.stdout and "jobs=" not in one.stderr + one.stdout
