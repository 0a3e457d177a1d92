"""The VoG toy experiment: distance to a boundary, stage selection, the run's files, determinism
and the ``roar vog-toy`` command."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from roar.cli import build_parser, main
from roar.core.errors import RoarError
from roar.core.locks import output_folder
from roar.stages import vog_toy as toy
from roar.vog.scores import vog_scores

EPOCHS = 9  # three snapshots per stage: enough for a boundary inside the plot, a fraction of a second


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------ boundary


def test_boundary_distance_matches_a_linear_model():
    w, b = np.array([0.7, -1.3]), 0.4
    bounds = ((-6.0, 6.0), (-6.0, 6.0))
    points = np.random.default_rng(0).uniform(-3, 3, size=(400, 2))
    signed = (points @ w + b) / np.linalg.norm(w)
    foot = points - signed[:, None] * w / np.linalg.norm(w)
    points = points[(np.abs(foot) < 5.5).all(axis=1)]  # the nearest boundary point lies inside the grid
    expected = np.abs(points @ w + b) / np.linalg.norm(w)

    got = toy.boundary_distance(lambda x: x @ w + b, points, bounds, resolution=101)

    assert len(points) > 300
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-9)


def test_boundary_distance_of_a_curved_boundary_and_of_none():
    points = np.random.default_rng(1).uniform(-4, 4, size=(200, 2))
    radius = 2.5
    circle = toy.boundary_distance(lambda x: np.linalg.norm(x, axis=1) - radius, points, ((-5, 5), (-5, 5)), 400)
    np.testing.assert_allclose(circle, np.abs(np.linalg.norm(points, axis=1) - radius), atol=1e-3)

    nowhere = toy.boundary_distance(lambda x: np.ones(len(x)), points, ((-5, 5), (-5, 5)), 50)
    assert np.isinf(nowhere).all()


# --------------------------------------------------------------------------------------- stages


def test_a_stage_uses_only_its_own_snapshots():
    rng = np.random.default_rng(0)
    k, n = 9, 12
    gradients = np.empty((k, n, 2))
    gradients[:3] = rng.normal(size=(1, n, 2))  # early: the same gradient three times
    gradients[3:6] = rng.normal(size=(1, n, 2))  # middle: another constant
    gradients[6:] = rng.normal(size=(3, n, 2))  # late: varies
    labels = np.arange(n) % 2

    early, positions = toy.toy_vog(gradients, labels, "early")
    middle, _ = toy.toy_vog(gradients, labels, "middle")
    late, _ = toy.toy_vog(gradients, labels, "late")
    complete, everything = toy.toy_vog(gradients, labels, "complete")

    assert positions == [0, 1, 2] and everything == list(range(k))
    # A mean taken over every epoch instead of the stage's would make these non-zero.
    np.testing.assert_allclose(early["vog"], 0.0, atol=1e-12)
    np.testing.assert_allclose(middle["vog"], 0.0, atol=1e-12)
    assert (late["vog"] > 0.1).all()
    manual = gradients[6:].std(axis=0).mean(axis=1)
    np.testing.assert_allclose(late["vog"], manual)
    np.testing.assert_allclose(complete["vog"], vog_scores(gradients))
    for c in (0, 1):
        sel = labels == c
        z = late["vog_normalize"][sel]
        np.testing.assert_allclose([z.mean(), z.std()], [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(late["vog_abs_normalize"], np.abs(late["vog_normalize"]))


def test_a_stage_needs_enough_epochs():
    with pytest.raises(RoarError, match="at least 3 epochs"):
        toy.toy_vog(np.zeros((2, 4, 2)), np.zeros(4), "middle")
    with pytest.raises(RoarError, match="at least 3 epochs"):
        toy.run_toy(stage="middle", epochs=2)
    with pytest.raises(RoarError, match="epochs must be at least 1"):
        toy.run_toy(epochs=0)


# ------------------------------------------------------------------------------------------ runs


def test_toy_data_follows_the_setting():
    data = toy.make_toy_data(0)
    assert data.x.shape == (500, 2) and len(data.train) == 450 and len(data.test) == 50
    assert not set(data.train) & set(data.test)
    np.testing.assert_array_equal(data.labels, (data.blobs != 0).astype(int))
    assert set(np.unique(data.blobs)) == {0, 1, 2}


def test_run_writes_figures_scores_and_summary(tmp_path):
    for split, n in (("test", 50), ("train", 450)):
        out = tmp_path / split
        summary = toy.run_toy(split=split, stage="late", vog_cal="normalize", epochs=EPOCHS, out=out)
        for name in ("boundary.png", "vog_vs_distance.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = _rows(out / "scores.csv")
        assert len(rows) == n and {r["split"] for r in rows} == {split}
        assert list(rows[0]) == toy.COLUMNS
        assert all(np.isfinite(float(r["distance"])) for r in rows)
        saved = json.loads((out / "summary.json").read_text())
        assert saved["points"] == n and saved["snapshots_used"] == 3 and saved["snapshot_epochs"] == [7, 9]
        assert np.isfinite(saved["spearman_rho"]) and -1 <= saved["spearman_rho"] <= 1
        assert saved == {**summary, "boundary_grid": saved["boundary_grid"]}  # tuples become lists in JSON
        provenance = json.loads((out / "provenance.json").read_text())
        assert provenance["seed"] == 0 and provenance["roar_version"] and provenance["torch"]


def test_same_seed_same_scores(tmp_path):
    a = toy.run_toy(split="test", epochs=EPOCHS, seed=3, out=tmp_path / "a")
    b = toy.run_toy(split="test", epochs=EPOCHS, seed=3, out=tmp_path / "b")
    c = toy.run_toy(split="test", epochs=EPOCHS, seed=4, out=tmp_path / "c")
    assert (tmp_path / "a" / "scores.csv").read_bytes() == (tmp_path / "b" / "scores.csv").read_bytes()
    assert a["spearman_rho"] == b["spearman_rho"]
    assert (tmp_path / "a" / "scores.csv").read_bytes() != (tmp_path / "c" / "scores.csv").read_bytes()
    assert c["seed"] == 4


# ------------------------------------------------------------------------------------------- CLI


def test_cli_runs_and_prints_one_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(["vog-toy", "--split", "test", "--epochs", str(EPOCHS), "--vog-cal", "abs_normalize", "--out", str(out)])
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "Spearman rho" in line and "50 points" in line and str(out) in line
    assert json.loads((out / "summary.json").read_text())["vog_cal"] == "abs_normalize"


def test_cli_rejects_bad_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["vog-toy", "--stage", "final"])
    assert exc.value.code != 0
    assert "invalid choice" in capsys.readouterr().err
    assert main(["vog-toy", "--stage", "middle", "--epochs", "2", "--out", str(tmp_path)]) == 2
    assert "at least 3 epochs" in capsys.readouterr().err


def test_cli_refuses_an_out_that_is_a_file_or_has_another_writer(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    for out in (target, target / "inside"):
        assert main(["vog-toy", "--epochs", str(EPOCHS), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: cannot write in {out}: {target} is a file, not a folder"
    assert target.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

    busy = tmp_path / "busy"
    with output_folder(busy):
        assert main(["vog-toy", "--epochs", str(EPOCHS), "--out", str(busy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: another process (pid {os.getpid()} on ") and f"is writing {busy}" in err
    assert list(busy.iterdir()) == []


def test_cli_choices_match_the_module():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["vog-toy"]
    choices = {a.dest: tuple(a.choices) for a in sub._actions if a.choices}
    assert choices == {"split": toy.SPLITS, "stage": toy.STAGES, "vog_cal": toy.CALIBRATIONS}
