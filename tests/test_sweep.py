"""The ROAR/KAR sweep: a fixed plan, exact sharding, resumable results, summaries and plot."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_copy

from roar.config import load_config
from roar.core.errors import RoarError
from roar.stages.extract import run as extract
from roar.stages.retrain.results import append_result, read_results
from roar.stages.retrain.summary import aggregate
from roar.stages.retrain.sweep import parse_shard, plan
from roar.stages.retrain.sweep import run as evaluate

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_shards_partition_the_plan_with_no_overlap_and_no_gap():
    cfg = load_config(None, ["retrain.seeds=2", "retrain.thresholds=[10, 50, 90]"])
    runs = plan(cfg, ["roar", "kar"], ["gradient", "random", "sobel"])
    assert len(runs) == 2 + 2 * 3 * 3 * 2
    assert runs == plan(cfg, ["roar", "kar"], ["gradient", "random", "sobel"])
    for n in (1, 3, 4, 7):
        shards = [runs[i::n] for i in range(n)]
        flat = [r for s in shards for r in s]
        assert sorted(flat, key=lambda r: r.key) == sorted(runs, key=lambda r: r.key)
        assert len(set(flat)) == len(flat)
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "x", "-1/2"):
        with pytest.raises(RoarError, match="--shard"):
            parse_shard(bad)


def test_methods_missing_from_the_store_are_named():
    cfg = load_config(None, ["retrain.methods=[gradient, vargrad]"])
    with pytest.raises(RoarError, match="vargrad not in both attribution stores"):
        plan(cfg, ["roar"], ["gradient", "random"])


def test_results_survive_a_torn_line(tmp_path):
    path = tmp_path / "results.csv"
    row = {
        "mode": "roar",
        "method": "m",
        "threshold": "10",
        "seed": 0,
        "test_accuracy": "0.5",
        "test_loss": "1",
        "epochs": 1,
        "seconds": 2,
    }
    inputs = {"maps": {"train": "ab", "test": "cd"}}
    assert append_result(path, row, inputs)
    with open(path, "a") as f:
        f.write("roar,m,30,0,0.4")  # killed mid-append
    assert append_result(path, {**row, "threshold": "50"}, inputs)
    assert not append_result(path, {**row, "threshold": "50"}, inputs), "computed meanwhile by another shard"
    assert append_result(path, {**row, "threshold": "50"}, {"maps": {"train": "ef", "test": "cd"}})
    rows = read_results(path)
    assert [r["threshold"] for r in rows] == ["10", "50", "50"]
    assert rows[0]["inputs"] == rows[1]["inputs"] != rows[2]["inputs"]
    recorded = json.loads((tmp_path / "inputs.json").read_text())
    assert recorded[rows[2]["inputs"]] == {"maps": {"train": "ef", "test": "cd"}}


def test_aggregate_gives_mean_and_sample_std():
    rows = [{"mode": "roar", "method": "g", "threshold": "10", "test_accuracy": a} for a in ("0.5", "0.7")]
    (group,) = aggregate(rows)
    assert (
        group["mean"] == pytest.approx(0.6) and group["std"] == pytest.approx(0.1414213, rel=1e-5) and group["n"] == 2
    )


def test_sweep_end_to_end_resumes_and_summarises(trained_run, tmp_path):
    cfg, sets = run_copy(
        trained_run,
        tmp_path,
        "sweep",
        [
            "attribution.methods=[ground_truth, random]",
            "retrain.thresholds=[50]",
            "retrain.seeds=1",
            "retrain.training.epochs=1",
        ],
    )
    out = cfg.run_dir
    extract(cfg)
    first = evaluate(cfg, ["roar"], shard="0/2")
    rows = read_results(out / "retrain" / "results.csv")
    assert first["ran"] == len(rows) == 2  # runs 0 and 2 of [baseline, ground_truth, random]
    second = evaluate(cfg, ["roar"])
    assert second["ran"] == 1, "finished runs must be skipped"
    rows = read_results(out / "retrain" / "results.csv")
    assert sorted((r["mode"], r["method"]) for r in rows) == [
        ("baseline", "unmodified"),
        ("roar", "ground_truth"),
        ("roar", "random"),
    ]
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    for name in ("summary.csv", "summary.md", "accuracy.png", "config.yaml", "provenance.json"):
        assert (out / "retrain" / name).exists(), name
    assert "ground_truth" in (out / "retrain" / "summary.md").read_text()
    assert not (out / "retrain" / "runs").exists() or not any((out / "retrain" / "runs").iterdir())
    other = load_config(REPO / "configs" / "smoke.yaml", [*sets, "retrain.training.epochs=2"])
    provenance = json.loads((out / "retrain" / "provenance.json").read_text())
    assert provenance["retraining_recipe"]["name"] == "fast"
    assert provenance["retraining_recipe"]["epochs"] == 1 and provenance["retraining_recipe"]["whiten_init"]
    again = evaluate(other, ["roar"])
    assert again["ran"] == again["recomputed"] == 3
    assert "(3 of 3 recomputed: settings changed: recipe.epochs)" in again.summary()
    assert {r["epochs"] for r in read_results(out / "retrain" / "results.csv")} == {"2"}


def test_leakage_runs_train_on_the_mask_alone(trained_run, tmp_path):
    from roar.data import build_dataset
    from roar.stages.retrain.sweep import Run, _sources

    overrides = [
        "attribution.methods=[ground_truth]",
        "retrain.methods=[ground_truth]",
        "retrain.leakage=true",
        "retrain.thresholds=[30]",
        "retrain.seeds=2",
    ]
    cfg, _ = run_copy(trained_run, tmp_path, "leak", overrides)
    runs = plan(cfg, ["roar"], ["ground_truth"])
    assert [(r.mode, r.threshold) for r in runs].count(("leak", 30.0)) == 1  # one seed only
    # KAR keeping the top 70% removes exactly ROAR's 30% complement: one leakage run serves both.
    symmetric = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"thresholds": [30, 70]})})
    leaks = [r for r in plan(symmetric, ["roar", "kar"], ["ground_truth"]) if r.mode == "leak"]
    assert leaks == [Run("leak", "ground_truth", 30.0, 0), Run("leak", "ground_truth", 70.0, 0)]
    kar_only = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"leakage": [10, 30]})})
    assert [r.threshold for r in plan(kar_only, ["kar"], ["ground_truth"]) if r.mode == "leak"] == [70.0, 90.0]
    extract(cfg)
    dataset = build_dataset(cfg.dataset)
    train, _ = _sources(cfg, dataset, Run("leak", "ground_truth", 30.0, 0), "cpu")
    images, labels, idx = next(train.batches(16))
    masks = dataset.train.masks[idx] == 1
    assert set(images.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(images[:, 0].bool(), images[:, 2].bool())
    # ROAR at 30% with the oracle map removes object pixels first: all of them where they fit.
    removed = images[:, 0].bool()
    assert (removed.flatten(1).sum(1) == round(0.3 * 32 * 32)).all()
    small = masks.flatten(1).sum(1) <= round(0.3 * 32 * 32)
    assert small.any() and not (masks & ~removed)[small].any()


def test_training_augments_the_ablated_images_and_evaluation_does_not(trained_run, tmp_path, monkeypatch):
    """Loader order: ablation → augmentation → normalisation (inside the model); test set unaugmented."""
    import roar.training.trainer as trainer
    from roar.data import build_dataset
    from roar.stages.retrain.sweep import Run, retrain, retraining_recipe

    overrides = ["attribution.methods=[ground_truth]", "retrain.methods=[ground_truth]", "retrain.training.epochs=1"]
    cfg, _ = run_copy(trained_run, tmp_path, "order", overrides)
    extract(cfg)
    dataset = build_dataset(cfg.dataset)
    fill = torch.tensor(dataset.mean).view(1, 3, 1, 1)
    seen = []
    augment = trainer.random_crop_flip

    def recording(images, *args, **kwargs):
        seen.append(images.clone())
        return augment(images, *args, **kwargs)

    monkeypatch.setattr(trainer, "random_crop_flip", recording)
    retrain(cfg, dataset, Run("roar", "ground_truth", 50.0, 0), tmp_path / "run", torch.device("cpu"), inputs={})
    batch_size = retraining_recipe(cfg).batch_size
    assert len(seen) == len(dataset.train.images) // batch_size, "only training batches are augmented"
    for images in seen:
        assert images.min() >= 0 and images.max() <= 1, "normalisation must come after augmentation"
        filled = (images == fill).all(1).flatten(1).sum(1)  # pixels holding the [0, 1]-space mean
        assert (filled >= round(0.5 * 32 * 32)).all(), "augmentation received images that were not ablated"


def test_a_sweep_killed_mid_run_resumes_to_the_rows_of_an_uninterrupted_one(trained_run, tmp_path):
    import shutil
    import signal
    import subprocess
    import sys
    import time

    overrides = ["attribution.methods=[ground_truth]", "retrain.methods=[ground_truth]", "retrain.training.epochs=2"]
    straight, _ = run_copy(trained_run, tmp_path, "straight", overrides)
    killed, sets = run_copy(trained_run, tmp_path, "killed", overrides)
    extract(straight)
    shutil.copytree(straight.run_dir / "attributions", killed.run_dir / "attributions")
    command = [sys.executable, "-m", "roar", "retrain", "--config", "configs/smoke.yaml", "--mode", "roar"]
    command += [x for s in sets for x in ("--set", s)]

    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed.run_dir / "retrain" / "runs" / "roar-ground_truth-50-seed0" / "last.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    results = killed.run_dir / "retrain" / "results.csv"
    assert [r["mode"] for r in read_results(results)] == ["baseline"], "killed outside the second run"

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    evaluate(straight, ["roar"])

    def rows(cfg):
        keep = ("mode", "method", "threshold", "seed", "test_accuracy", "test_loss", "epochs")
        return [{k: r[k] for k in keep} for r in read_results(cfg.run_dir / "retrain" / "results.csv")]

    assert rows(killed) == rows(straight) and len(rows(killed)) == 2


def test_jobs_share_the_sweep_in_child_processes_with_the_rows_of_one_process(trained_run, tmp_path, monkeypatch):
    import shutil

    import roar.stages.retrain.jobs as jobs

    overrides = ["attribution.methods=[ground_truth, random]", "retrain.thresholds=[50]", "retrain.training.epochs=1"]
    alone, _ = run_copy(trained_run, tmp_path, "alone", overrides)
    extract(alone)
    evaluate(alone, ["roar"])
    shared, _ = run_copy(trained_run, tmp_path, "shared", [*overrides, "retrain.jobs=2"])
    shutil.copytree(alone.run_dir / "attributions", shared.run_dir / "attributions")
    # Children get cores // jobs threads each: as many as this process has, so the numbers can be compared.
    monkeypatch.setattr(jobs, "cores", lambda: 2 * torch.get_num_threads())
    summary = evaluate(shared, ["roar"])
    assert summary["ran"] == 3 and summary["runs"] == 3

    def rows(cfg):
        return {
            tuple(r[c] for c in ("mode", "method", "threshold", "seed")): r["test_accuracy"]
            for r in read_results(cfg.run_dir / "retrain" / "results.csv")
        }

    assert rows(shared) == rows(alone)
    assert (shared.run_dir / "retrain" / "summary.md").exists()
    logs = sorted(p.name for p in (shared.run_dir / "retrain" / "jobs").glob("shard-*.log"))
    assert logs == ["shard-0.log", "shard-1.log"]
    assert not (shared.run_dir / "retrain" / "jobs" / "config.yaml").exists()
    recorded = load_config(shared.run_dir / "retrain" / "config.yaml")
    assert recorded.retrain.jobs == 2, "the run's config.yaml is the parent's, not a shard's"


def test_a_failing_shard_is_reported_by_its_error_line(tmp_path):
    from roar.stages.retrain.jobs import run_shards

    with pytest.raises(RoarError, match=r"shard [01]/2 of the sweep failed \(exit 2\): .*unknown key 'epocs'"):
        run_shards("training: {epocs: 3}\n", ["roar"], 2, tmp_path, lambda: 0, 4)
    assert not (tmp_path / "jobs" / "config.yaml").exists()
