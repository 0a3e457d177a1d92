"""``roar metrics``: results, ranks and the meta-evaluation; reuse per (method, metric); refusals."""

from __future__ import annotations

import numpy as np
import pytest

from roar.config.metrics import MetricEntry
from roar.core.errors import RoarError
from roar.core.tables import read_csv
from roar.stages import metrics
from roar.stages.extract import run as extract
from tests.helpers import run_copy

METHODS = "[gradient, random, ground_truth, oracle_blur, oracle_dilate, oracle_shuffle]"
METRIC_NAMES = "[pointing_game, relevance_mass, relevance_rank, sparseness, complexity]"


@pytest.fixture(scope="module")
def extracted(trained_run, tmp_path_factory):
    """A copy of the small trained run with the oracle's controlled degradations in its test store."""
    sets = [
        f"attribution.methods={METHODS}",
        "attribution.splits=[test]",
        "metrics.max_images=24",
        "metrics.batch_size=10",
        f"metrics.metrics={METRIC_NAMES}",
    ]
    cfg, sets = run_copy(trained_run, tmp_path_factory.mktemp("metrics"), "run", sets)
    extract(cfg)
    return cfg, sets


def test_results_ranks_and_meta_evaluation(extracted):
    cfg, _ = extracted
    result = metrics.run(cfg)
    out = cfg.run_dir / "metrics"
    for name in ("results.csv", "summary.md", "summary.json", "ranks.png", "meta.csv", "agreement.csv"):
        assert (out / name).exists(), name
    rows = read_csv(out / "results.csv")
    assert len(rows) == 6 * 5 and all(np.isfinite(float(r["value"])) for r in rows)
    assert {r["images"] for r in rows} == {"24"}
    known = {r["measure"]: r for r in read_csv(out / "meta.csv")}
    assert set(known) == {"pointing_game", "relevance_mass", "relevance_rank", "sparseness", "complexity"}
    # relevance mass on the object is ordered by construction: the oracle keeps all of it, blurring and
    # dilating spill some, shuffling moves half away, random spreads it evenly
    assert float(known["relevance_mass"]["tau_of_means"]) == pytest.approx(1.0)
    text = (out / "summary.md").read_text()
    assert "Which measure recovers the known order" in text and "ground_truth ≻" in text
    assert result["computed"] == 30 and "best at recovering" in result.summary()


def test_rerun_reuses_each_pair_and_a_new_setting_recomputes_only_its_metric(extracted):
    cfg, _ = extracted
    again = metrics.run(cfg)
    assert again["computed"] == 0 and again["recomputed"] == ""
    entries = [
        e if e.name != "pointing_game" else e.model_copy(update={"params": {"tolerance": 0}})
        for e in cfg.metrics.metrics
    ]
    changed = metrics.run(cfg.model_copy(update={"metrics": cfg.metrics.model_copy(update={"metrics": entries})}))
    assert changed["computed"] == 6
    assert "settings changed: params.tolerance" in changed["recomputed"]


def test_config_errors_name_the_metric(extracted):
    from roar.config import load_config
    from tests.conftest import REPO

    with pytest.raises(RoarError, match="unknown metric 'pointing_gam'.*pointing_game"):
        load_config(REPO / "configs" / "smoke.yaml", ["metrics.metrics=[pointing_gam]"])
    with pytest.raises(RoarError, match="metrics.known_order"):
        load_config(REPO / "configs" / "smoke.yaml", ["metrics.known_order=[[random]]"])


def test_methods_missing_from_the_store_are_refused_before_anything_is_written(extracted, tmp_path):
    cfg, sets = extracted
    other = cfg.model_copy(
        update={"output_dir": tmp_path / "x", "metrics": cfg.metrics.model_copy(update={"methods": ["vargrad"]})}
    )
    with pytest.raises(RoarError):
        metrics.run(other)
    assert not (tmp_path / "x" / "metrics").exists()


def test_agreement_is_somers_d_given_the_known_order():
    from scipy.stats import somersd

    from roar.stages.meta import agreement

    rng = np.random.default_rng(0)
    for _ in range(20):
        quality = rng.integers(0, 4, size=7).astype(float)
        values = rng.integers(0, 5, size=7).astype(float)  # ties in both
        if len(set(quality)) < 2:
            continue
        assert agreement(values, quality) == pytest.approx(somersd(quality, values).statistic)
    quality = np.array([3.0, 2.0, 2.0, 1.0, 0.0])
    assert agreement(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), quality) == 1.0  # a tied tier does not cap it
    assert agreement(-np.array([5.0, 4.0, 3.0, 2.0, 1.0]), quality) == -1.0


def test_retraining_and_curves_are_judged_when_their_results_hold_the_controls(tmp_path):
    from roar.config import load_config
    from roar.core.tables import write_csv
    from roar.stages.meta import evaluate
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"output_dir={tmp_path}"])
    rows = []
    # ROAR: the better the map, the lower the accuracy after removal; seed 1 swaps blur and shuffle
    accuracy = {"ground_truth": 0.2, "oracle_blur": 0.3, "oracle_dilate": 0.35, "oracle_shuffle": 0.5, "random": 0.9}
    for seed in (0, 1):
        for method, acc in accuracy.items():
            if seed == 1 and method in ("oracle_blur", "oracle_shuffle"):
                acc = accuracy["oracle_shuffle" if method == "oracle_blur" else "oracle_blur"]
            rows.append({"mode": "roar", "method": method, "threshold": 50, "seed": seed, "test_accuracy": acc})
    (tmp_path / "retrain").mkdir()
    write_csv(tmp_path / "retrain" / "results.csv", rows)
    (tmp_path / "curves_road").mkdir()
    curves = [{"method": m, "accuracy_morf": a, "accuracy_lerf": 1 - a} for m, a in accuracy.items()]
    write_csv(tmp_path / "curves_road" / "summary.csv", curves)
    known = {r["measure"]: r for r in evaluate(cfg, [], {}).known}
    roar = known["ROAR 50%"]
    # seed 0 is perfect (1); seed 1 gets 2 of the 9 known pairs wrong: (9 − 2 − 2) / 9
    assert roar["tau"] == pytest.approx((1 + 5 / 9) / 2) and roar["samples"] == 2
    assert known["MoRF (curves_road)"]["tau"] == 1.0 and known["LeRF (curves_road)"]["tau"] == 1.0


def test_plugin_methods_with_metrics_that_recompute_maps_are_refused_before_anything_is_written(
    extracted, tmp_path, monkeypatch
):
    cfg, _ = extracted
    monkeypatch.setattr(metrics, "_method_of", lambda identity: None)  # every stored method a plug-in
    other = cfg.model_copy(
        update={
            "output_dir": tmp_path / "p",
            "metrics": cfg.metrics.model_copy(update={"metrics": [MetricEntry(name="max_sensitivity")]}),
        }
    )
    import shutil

    shutil.copytree(cfg.run_dir / "train", tmp_path / "p" / "train")
    shutil.copytree(cfg.run_dir / "attributions", tmp_path / "p" / "attributions")
    with pytest.raises(RoarError, match="max_sensitivity recompute maps, which plug-in"):
        metrics.run(other)
    assert not (tmp_path / "p" / "metrics").exists()
