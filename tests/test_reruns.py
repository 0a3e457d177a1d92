"""Reruns never reuse stale results, every output folder has one writer, a refused run changes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_copy

from roar.cli import main
from roar.config import load_config
from roar.core.errors import RoarError
from roar.core.locks import FileLock, output_folder
from roar.stages.extract import run as extract
from roar.stages.retrain.results import read_results
from roar.stages.retrain.sweep import run as evaluate
from roar.stages.train import run as train

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (lock files aside) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def cli(sets: list[str], *command: str) -> list[str]:
    return [*command, "--config", str(SMOKE), *(x for s in sets for x in ("--set", s))]


def test_a_model_section_that_contradicts_the_trained_model_is_refused_naming_the_key(trained_run, tmp_path, capsys):
    overrides = ["attribution.methods=[ground_truth]", "retrain.methods=[ground_truth]"]
    cfg, sets = run_copy(trained_run, tmp_path, "widths", overrides)
    extract(cfg)
    before = snapshot(cfg.run_dir)
    for command in (("extract",), ("retrain", "--mode", "roar"), ("curves",)):
        assert main(cli([*sets, "model.widths=[8,16,32]"], *command)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: model.widths: this config says [8, 16, 32], but ") and "[16, 16, 32]" in err
        assert len(err.splitlines()) == 1
    assert snapshot(cfg.run_dir) == before, "a refused run changes nothing on disk"


def test_retrain_recomputes_only_the_rows_of_maps_that_changed(trained_run, tmp_path):
    common = ["retrain.thresholds=[50]", "retrain.training.epochs=1"]
    cfg, sets = run_copy(trained_run, tmp_path, "stale", [*common, "attribution.methods=[ground_truth, random]"])
    extract(cfg)
    first = evaluate(cfg, ["roar"])
    assert first["ran"] == 3 and first["recomputed"] == 0
    results = cfg.run_dir / "retrain" / "results.csv"
    old = {(r["mode"], r["method"]): r for r in read_results(results)}

    for split in ("train", "test"):  # the same method name, other content
        (cfg.run_dir / "attributions" / f"{split}.h5").unlink()
    swapped = load_config(SMOKE, [*sets, "attribution.methods=[ground_truth, {name: random, method: sobel}]"])
    extract(swapped)
    again = evaluate(swapped, ["roar"])
    assert again["ran"] == 1 and again["recomputed"] == 1
    assert "ran 1 of 3 retraining runs (1 of 3 recomputed: maps of random changed)" in again.summary()
    new = {(r["mode"], r["method"]): r for r in read_results(results)}
    assert set(new) == set(old)
    assert new[("roar", "ground_truth")] == old[("roar", "ground_truth")]
    assert new[("baseline", "unmodified")] == old[("baseline", "unmodified")]
    assert new[("roar", "random")]["inputs"] != old[("roar", "random")]["inputs"]
    assert evaluate(swapped, ["roar"])["ran"] == 0

    fewer = load_config(SMOKE, [*sets, "attribution.methods=[ground_truth]", "retrain.methods=[ground_truth]"])
    for split in ("train", "test"):
        (cfg.run_dir / "attributions" / f"{split}.h5").unlink()
    extract(fewer)
    result = evaluate(fewer, ["roar"])
    assert result["ran"] == 0 and result["removed"] == 1, "a row whose maps are gone is dropped, and said so"
    assert "1 row of earlier inputs outside this sweep removed" in result.summary()
    assert {r["method"] for r in read_results(results)} == {"unmodified", "ground_truth"}


def test_a_run_rejected_for_its_settings_writes_nothing_and_its_corrected_rerun_runs(trained_run, tmp_path, capsys):
    overrides = ["attribution.methods=[ground_truth]", "retrain.methods=[ground_truth]", "retrain.thresholds=[50]"]
    cfg, sets = run_copy(trained_run, tmp_path, "rejected", [*overrides, "retrain.training.epochs=1"])
    extract(cfg)
    before = snapshot(cfg.run_dir)
    assert main(cli([*sets, "retrain.granularity=element"], "retrain", "--mode", "roar")) == 2
    assert "element granularity needs one map per channel" in capsys.readouterr().err
    assert snapshot(cfg.run_dir) == before and not (cfg.run_dir / "retrain").exists()
    assert main(cli(sets, "retrain", "--mode", "roar")) == 0
    assert "ran 2 of 2 retraining runs" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["train", "attributions", "retrain", "curves"])
def test_a_second_writer_of_any_stage_is_refused_and_changes_nothing(trained_run, tmp_path, capsys, stage):
    overrides = ["attribution.methods=[ground_truth]", "retrain.methods=[ground_truth]", "retrain.thresholds=[50]"]
    cfg, sets = run_copy(trained_run, tmp_path, stage, overrides)
    if stage != "attributions":
        extract(cfg)
    command = {"train": ("train",), "attributions": ("extract",), "retrain": ("retrain",), "curves": ("curves",)}
    before = snapshot(cfg.run_dir)
    with output_folder(cfg.run_dir / stage):
        assert main(cli(sets, *command[stage])) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: another process (pid {os.getpid()} on {os.uname().nodename} since {err.split(' since ')[1][:19]}) "
        f"is writing {cfg.run_dir / stage}; wait for it to finish or stop it"
    )
    assert snapshot(cfg.run_dir) == before


def test_shards_share_a_sweep_but_never_one_shard_twice(trained_run, tmp_path):
    overrides = ["attribution.methods=[ground_truth]", "retrain.methods=[ground_truth]", "retrain.thresholds=[50]"]
    cfg, _ = run_copy(trained_run, tmp_path, "shards", overrides)
    extract(cfg)
    out = cfg.run_dir / "retrain"
    with output_folder(out, shared=True), FileLock(out / "shard-0-of-2"):
        with pytest.raises(RoarError, match=r"another process .* is writing .*retrain/shard-0-of-2"):
            evaluate(cfg, ["roar"], shard="0/2")
        with pytest.raises(RoarError, match=r"another process .* is writing .*retrain;"):
            evaluate(cfg, ["roar"])  # a whole sweep beside a shard
        assert not (out / "results.csv").exists()


def test_two_trainings_of_one_run_at_once_one_is_refused(tmp_path, data_root):
    sets = [
        f"output_dir={tmp_path / 'run'}",
        f"dataset.root={data_root}",
        "dataset.train_size=256",
        "training.epochs=400",
    ]
    command = [sys.executable, "-m", "roar", *cli(sets, "train")]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "run" / "train" / "metrics.jsonl"
        deadline = time.time() + 300
        while not metrics.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first training ended before the second started"
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first training must outlive the second for this test to mean anything"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert second.stderr.strip().startswith(f"error: another process (pid {first.pid} on ")
    epochs = [line for line in metrics.read_text().splitlines() if line.strip()]
    assert [int(__import__("json").loads(line)["epoch"]) for line in epochs] == list(range(1, len(epochs) + 1))


def test_a_refused_training_leaves_the_run_as_it_was_and_a_rerun_cleans_up(trained_run, tmp_path, capsys):
    cfg, sets = run_copy(trained_run, tmp_path, "refused")
    folder = cfg.run_dir / "train"
    (folder / "snapshots").mkdir(exist_ok=True)
    before = snapshot(folder)
    assert main(cli([*sets, "training.epochs=7"], "train")) == 2
    err = capsys.readouterr().err
    assert "differs in: training.epochs" in err and len(err.strip().splitlines()) == 1
    assert snapshot(folder) == before, "config.yaml and provenance.json must still describe the trained model"

    leftovers = [folder / ".last.pt.k2j3.tmp", folder / "snapshots" / ".epoch_0001.pt.x9.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    (folder / "summary.json").write_text('{"test_accur')  # torn by hand: not by roar, whose writes are atomic
    result = train(cfg)
    assert result["test_accuracy"] > 0 and not any(path.exists() for path in leftovers)
    assert "test_accuracy" in (folder / "summary.json").read_text()
    assert snapshot(folder)["model.pt"] == before["model.pt"]


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    assert main(["train", "--config", str(SMOKE), "--set", f"output_dir={blocker / 'demo'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write in {blocker / 'demo' / 'train'}: {blocker} is a file, not a folder"
