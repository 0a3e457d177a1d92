"""Perturbation curves: removal order, patch steps, fills, measures, areas and the ``roar curves`` stage."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_copy
from torch import nn

from roar.config import load_config
from roar.core.errors import RoarError
from roar.core.tables import read_csv
from roar.metrics import curve_measures
from roar.perturb.curves import (
    curve_sums,
    plan_steps,
    position_ranks,
    removal_mask,
    softmax,
)
from roar.perturb.fills import PatchMeanFill, ZeroFillConfig, build_fill
from roar.perturb.patches import patch_scores
from roar.stages.curves import areas, run
from roar.stages.extract import run as extract

H = W = 6
REPO = Path(__file__).resolve().parents[1]


def known_ranking():
    """A map whose ranking is known: position p (row-major) has relevance P − p, so rank(p) = p."""
    maps = torch.arange(H * W, 0, -1, dtype=torch.float32).view(1, H, W)
    return maps, torch.tensor([0])


@pytest.mark.parametrize("k", [0, 1, 5, 18, 36])
def test_morf_removes_the_top_first_and_lerf_the_bottom_first(k):
    maps, indices = known_ranking()
    r, p = position_ranks(maps, indices, seed=0, granularity="pixel", patch=1, shape=(H, W))
    assert p == H * W
    flat = torch.arange(H * W).view(1, 1, H, W)
    assert torch.equal(removal_mask(r, k, p, "morf"), flat < k)
    assert torch.equal(removal_mask(r, k, p, "lerf"), flat >= H * W - k)


def test_random_order_removes_exactly_k_in_a_seeded_order_independent_of_the_map():
    indices = torch.arange(4)
    r1, p = position_ranks(None, indices, seed=3, granularity="pixel", patch=1, shape=(H, W))
    r2, _ = position_ranks(None, indices, seed=3, granularity="pixel", patch=1, shape=(H, W))
    r3, _ = position_ranks(None, indices, seed=4, granularity="pixel", patch=1, shape=(H, W))
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    assert (removal_mask(r1, 7, p, "random").flatten(1).sum(1) == 7).all()
    assert not torch.equal(r1[0], r1[1]), "each image gets its own random order"


def test_patch_step_zero_is_clean_and_step_one_removes_the_top_patch():
    # 6x6 image, patches of 3: four patches; put the largest mean in the bottom-right patch.
    maps = torch.zeros(1, H, W)
    maps[0, 3:, 3:] = 1.0
    maps[0, 0, 0] = 5.0  # a single hot pixel: the top-left patch's mean is 5/9 < 1
    r, p = position_ranks(maps, torch.tensor([0]), seed=0, granularity="patch", patch=3, shape=(H, W))
    plan = plan_steps(2, p)
    assert p == 4 and [s.k for s in plan] == [0, 1, 2] and [s.fraction for s in plan] == [0, 0.25, 0.5]
    assert not removal_mask(r, plan[0].k, p, "morf").any()
    step1 = removal_mask(r, plan[1].k, p, "morf")[0, 0]
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[3:, 3:] = True
    assert torch.equal(step1, expected)
    step2 = removal_mask(r, plan[2].k, p, "morf")[0, 0]
    expected[:3, :3] = True
    assert torch.equal(step2, expected)


def test_edge_patches_are_scored_by_their_pixels_inside_the_image():
    maps = torch.ones(1, 5, 5)
    scores = patch_scores(maps, 3)  # a 2x2 grid; the edge patches hold 3x2, 2x3 and 2x2 pixels
    assert torch.allclose(scores, torch.ones(1, 1, 2, 2))


def test_patch_mean_replaces_every_channel_even_below_the_dataset_mean():
    """PGIG skipped channels whose mean was <= 0 after centring; here every channel is replaced."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, H, W, generator=g) * 0.2  # far below any dataset mean: negative when centred
    removed = torch.zeros(2, 3, H, W, dtype=torch.bool)
    removed[:, :, :3, 3:] = True
    from roar.perturb.fills import ablate

    out = ablate(images, removed, PatchMeanFill(), patch=3)
    patch_mean = images[:, :, :3, 3:].mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(out[:, :, :3, 3:], patch_mean.expand(-1, -1, 3, 3))
    assert torch.equal(out[~removed], images[~removed])


def test_plan_steps_counts_fractions_like_roar_and_refuses_too_many_patches():
    assert [s.k for s in plan_steps([0, 0.1, 0.5, 1.0], 1024)] == [0, 102, 512, 1024]
    assert [s.k for s in plan_steps([0.3], 5)] == [2]  # 1.5 rounds up, although 0.3 * 5 < 1.5 in binary
    with pytest.raises(ValueError, match="only 4 patches"):
        plan_steps(5, 4)


class Linear(nn.Module):
    """logits = W · flatten(x) + b, with class 2 the clean favourite."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * H * W, 3)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(3, 3 * H * W, generator=g) * 0.3)
            self.fc.bias.copy_(torch.tensor([0.0, 0.0, 3.0]))

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_measures_use_the_clean_prediction_not_class_zero():
    model = Linear().eval()
    g = torch.Generator().manual_seed(2)
    images = torch.rand(8, 3, H, W, generator=g)
    labels = torch.tensor([2, 2, 0, 1, 2, 2, 0, 2])
    maps = torch.rand(8, H, W, generator=g)
    indices = torch.arange(8)
    fill = build_fill("mean", mean=(0.5, 0.5, 0.5))
    sums = curve_sums(
        model, images, labels, indices, maps, "morf", [0, 0.5, 1.0], fill, measures=curve_measures(), seed=0
    )
    clean = softmax(model, images)
    c = clean.argmax(1)
    assert (c == 2).sum() >= 6, "the test needs a clean prediction other than class 0"
    means = sums.means()
    assert means["probability"][0] == pytest.approx(clean.gather(1, c[:, None]).mean().item(), abs=1e-6)
    assert means["relative_change"][0] == 0
    assert means["accuracy"][0] == pytest.approx((c == labels).float().mean().item())
    # At 50%: the same quantities computed by hand on the ablated images.
    r, p = position_ranks(maps, indices, 0, "pixel", 1, (H, W))
    removed = removal_mask(r, 18, p, "morf").expand_as(images)
    ablated = torch.where(removed, torch.full_like(images, 0.5), images)
    probs = softmax(model, ablated)
    p_c = probs.gather(1, c[:, None])[:, 0]
    p_clean = clean.gather(1, c[:, None])[:, 0]
    assert means["probability"][1] == pytest.approx(p_c.mean().item(), abs=1e-6)
    assert means["relative_change"][1] == pytest.approx(((p_clean - p_c).abs() / p_clean * 100).mean().item())
    assert means["accuracy"][1] == pytest.approx((probs.argmax(1) == labels).float().mean().item())
    # At 100% every image is the constant fill: one prediction for all.
    constant = softmax(model, torch.full_like(images, 0.5))
    assert means["probability"][2] == pytest.approx(constant.gather(1, c[:, None]).mean().item(), abs=1e-6)


def test_areas_integrate_over_the_fraction_not_the_step_index():
    fractions = [0.0, 0.1, 0.5, 1.0]
    accuracy = [1.0, 0.8, 0.4, 0.0]
    rows = [
        {"method": "m", "order": order, "step": i, "fraction": f, "accuracy": a, "probability": a, "relative_change": 0}
        for order, values in (("morf", accuracy), ("lerf", [1.0, 1.0, 1.0, 1.0]))
        for i, (f, a) in enumerate(zip(fractions, values if order == "morf" else values, strict=True))
    ]
    (table,) = areas(rows)
    by_hand = 0.1 * (1.0 + 0.8) / 2 + 0.4 * (0.8 + 0.4) / 2 + 0.5 * (0.4 + 0.0) / 2  # 0.43
    assert table["accuracy_morf"] == pytest.approx(by_hand)
    assert table["accuracy_lerf"] == pytest.approx(1.0)
    assert table["accuracy_lerf_minus_morf"] == pytest.approx(1.0 - by_hand)
    assert by_hand != pytest.approx(np.trapezoid(accuracy)), "the step index would give another area"


def test_curves_stage_writes_curves_resumes_and_recomputes_what_changed(trained_run, tmp_path):
    overrides = [
        "attribution.methods=[gradient, ground_truth]",
        "attribution.splits=[test]",
        "curves.steps=[0, 0.25, 0.5, 1.0]",
        "curves.max_images=96",
        "curves.batch_size=40",
    ]
    cfg, _ = run_copy(trained_run, tmp_path, "lerf", overrides)
    with pytest.raises(RoarError, match=r"no store at .*test.h5; run roar extract first"):
        run(cfg)
    extract(cfg)
    first = run(cfg)
    out = cfg.run_dir / "curves"
    rows = read_csv(out / "results.csv")
    curves = {(r["method"], r["order"]) for r in rows}
    assert curves == {
        ("gradient", "morf"),
        ("gradient", "lerf"),
        ("ground_truth", "morf"),
        ("ground_truth", "lerf"),
        ("random_order", "random"),
    }
    assert len(rows) == 5 * 4 and first["ran"] == 5 and first["images"] == 96
    assert {r["images"] for r in rows} == {"96"}
    step0 = {r["accuracy"] for r in rows if r["step"] == "0"}
    assert len(step0) == 1, "step 0 is the clean image for every curve"
    for name in ("summary.csv", "summary.md", "curves.png", "config.yaml", "provenance.json"):
        assert (out / name).exists(), name
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert {r["method"] for r in summary} == {"gradient", "ground_truth", "random_order"}
    again = run(cfg)
    assert again["ran"] == 0 and again["recomputed"] == 0, "finished curves must be reused"
    assert read_csv(out / "results.csv") == rows

    changed = cfg.model_copy(update={"curves": cfg.curves.model_copy(update={"fill": ZeroFillConfig()})})
    result = run(changed)
    assert result["ran"] == result["recomputed"] == 5
    assert "5 of 5 recomputed: settings changed: curves.fill.name" in result.summary()
    assert {r["fill"] for r in read_csv(out / "results.csv")} == {"zero"}


def test_curves_of_maps_recomputed_with_new_content_are_recomputed(trained_run, tmp_path):
    """Maps re-extracted under the same method name with other content (here: the store deleted and
    'gradient' extracted by another method) make that method's curves stale; the others are reused."""
    common = ["attribution.splits=[test]", "curves.steps=[0, 0.5, 1.0]", "curves.max_images=32"]
    cfg, sets = run_copy(trained_run, tmp_path, "stale", [*common, "attribution.methods=[gradient, ground_truth]"])
    extract(cfg)
    run(cfg)
    out = cfg.run_dir / "curves"
    old = {(r["method"], r["order"], r["step"]): r for r in read_csv(out / "results.csv")}

    (cfg.run_dir / "attributions" / "test.h5").unlink()
    swapped = load_config(
        REPO / "configs" / "smoke.yaml",
        [*sets, "attribution.methods=[{name: gradient, method: grad_x_input}, ground_truth]"],
    )
    extract(swapped)
    result = run(swapped)
    assert result["ran"] == 2 and result["recomputed"] == 2
    assert "2 of 5 recomputed: maps of gradient changed" in result.summary()
    new = {(r["method"], r["order"], r["step"]): r for r in read_csv(out / "results.csv")}
    assert {k: v for k, v in new.items() if k[0] != "gradient"} == {k: v for k, v in old.items() if k[0] != "gradient"}
    assert any(new[k] != old[k] for k in new if k[0] == "gradient" and k[2] != "0")


def test_curves_rerun_with_more_orders_computes_only_the_new_ones(trained_run, tmp_path):
    common = ["attribution.methods=[gradient]", "attribution.splits=[test]", "curves.steps=[0, 1.0]"]
    cfg, sets = run_copy(trained_run, tmp_path, "orders", [*common, "curves.max_images=16", "curves.orders=[morf]"])
    extract(cfg)
    assert run(cfg)["ran"] == 1
    more = load_config(REPO / "configs" / "smoke.yaml", [*sets, "curves.orders=[morf, lerf, random]"])
    result = run(more)
    assert result["ran"] == 2 and result["recomputed"] == 0
    rows = read_csv(cfg.run_dir / "curves" / "results.csv")
    assert {(r["method"], r["order"]) for r in rows} == {
        ("gradient", "morf"),
        ("gradient", "lerf"),
        ("random_order", "random"),
    }

    zero = ["curves.orders=[morf, lerf, random]", "curves.folder=curves_zero", "curves.fill=zero"]
    beside = load_config(REPO / "configs" / "smoke.yaml", [*sets, *zero])
    assert run(beside)["ran"] == 3, "another folder holds another protocol, computed apart"
    assert {r["fill"] for r in read_csv(cfg.run_dir / "curves_zero" / "results.csv")} == {"zero"}
    assert read_csv(cfg.run_dir / "curves" / "results.csv") == rows, "the first protocol's results are untouched"


def test_patch_degradation_with_patch_mean_fill_runs_through_the_stage(trained_run, tmp_path):
    overrides = [
        "attribution.methods=[gradient]",
        "attribution.splits=[test]",
        "curves.granularity=patch",
        "curves.patch_size=8",
        "curves.steps=16",
        "curves.fill={name: patch_mean}",
        "curves.orders=[morf]",
        "curves.max_images=32",
    ]
    cfg, _ = run_copy(trained_run, tmp_path, "patches", overrides)
    extract(cfg)
    run(cfg)
    rows = read_csv(cfg.run_dir / "curves" / "results.csv")
    assert [float(r["fraction"]) for r in rows] == [p / 16 for p in range(17)]
    assert {r["fill"] for r in rows} == {"patch_mean"} and {r["granularity"] for r in rows} == {"patch"}


def test_road_fill_runs_through_the_stage_and_falls_back_to_the_dataset_mean(trained_run, tmp_path):
    """ROAD imputes from the kept pixels; with every pixel removed nothing is left to impute from,
    so (noise off) it fills the dataset mean, exactly as the mean fill does."""
    common = [
        "attribution.methods=[gradient]",
        "attribution.splits=[test]",
        "curves.steps=[0, 0.5, 1.0]",
        "curves.orders=[morf]",
        "curves.max_images=32",
    ]
    curves = {}
    for name, fill in [("road", "{name: road, noise: 0}"), ("mean", "{name: mean}")]:
        cfg, _ = run_copy(trained_run, tmp_path, name, [*common, f"curves.fill={fill}"])
        extract(cfg)
        run(cfg)
        rows = [r for r in read_csv(cfg.run_dir / "curves" / "results.csv") if r["method"] == "gradient"]
        assert {r["fill"] for r in rows} == {fill.split(",")[0].split()[-1].strip("}")}
        curves[name] = {float(r["fraction"]): (float(r["accuracy"]), float(r["probability"])) for r in rows}
    assert curves["road"][0.0] == curves["mean"][0.0], "step 0 is the clean image for every fill"
    assert curves["road"][1.0] == pytest.approx(curves["mean"][1.0], abs=1e-6)
    assert curves["road"][0.5][1] != pytest.approx(curves["mean"][0.5][1], abs=1e-6), "half removed: imputed, not mean"


def test_a_new_curve_measure_reaches_every_output_and_older_parts_are_recomputed(trained_run, tmp_path, monkeypatch):
    """The stage builds its columns, tables and panels from the registered measures: one registered
    (here into a copy of the registry) appears in results.csv, summary.csv and summary.md with no
    edit to the stage, the measures already there keep their values, and a part written without the
    new column is computed again. A measure needing what the stage cannot supply is refused."""
    from roar.metrics import METRICS, CurveMeasure, register
    from roar.stages import curves as stage

    class Confidence(CurveMeasure):
        name = "confidence"
        direction = "lower"
        title = "Top probability"

        def evaluate_batch(self, *, perturbed, **_):
            return {self.name: perturbed.max(1).values}

    overrides = [
        "attribution.methods=[gradient]",
        "attribution.splits=[test]",
        "curves.steps=[0, 0.5, 1.0]",
        "curves.max_images=32",
    ]
    cfg, _ = run_copy(trained_run, tmp_path, "measures", overrides)
    extract(cfg)
    run(cfg)
    out = cfg.run_dir / "curves"
    before = read_csv(out / "results.csv")
    summary_before = read_csv(out / "summary.csv")

    registry = METRICS.copy()
    register(Confidence, into=registry)
    monkeypatch.setattr(stage, "curve_measures", lambda: curve_measures(registry))
    again = run(cfg)
    assert again["ran"] == 3, "every part lacked the new measure"
    assert "3 of 3 recomputed: settings changed: measures" in again.summary()
    after = read_csv(out / "results.csv")
    assert list(after[0]) == [
        *("method", "order", "granularity", "fill", "step", "fraction"),
        *("accuracy", "confidence", "probability", "relative_change", "images"),
    ]
    assert [{k: v for k, v in r.items() if k != "confidence"} for r in after] == before
    assert all(0 < float(r["confidence"]) <= 1 for r in after)
    summary = read_csv(out / "summary.csv")
    assert {"confidence_morf", "confidence_lerf", "confidence_lerf_minus_morf", "confidence_random"} <= set(summary[0])
    assert [{k: v for k, v in r.items() if not k.startswith("confidence")} for r in summary] == summary_before
    assert (
        "### Top probability — MoRF: lower is better; LeRF − MoRF: higher is better" in (out / "summary.md").read_text()
    )

    class OnTheObject(Confidence):
        name = "on_the_object"
        needs = frozenset({"model", "maps", "masks"})

    register(OnTheObject, into=registry)
    with pytest.raises(RoarError, match=r"on_the_object.*masks"):
        run(cfg)
