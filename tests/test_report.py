"""``roar report``: one page of a run, in HTML and markdown, from a full run and from a partial one.

The HTML is opened in headless Chromium (``tests/browser.py``): no console error, no request
leaving the file, a first screen that is not blank. In CI the browser must be there.
"""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from browser import is_blank, open_page, require_chromium
from helpers import run_copy
from markdown_it import MarkdownIt

from roar.core.errors import RoarError
from roar.stages.report import stage, trust
from roar.stages.report.document import Section, Table, Text

pytestmark = pytest.mark.timeout(600)

SECTIONS = [
    "Run",
    "Maps",
    "ROAR and KAR",
    "Perturbation curves",
    "Metrics",
    "Which method to trust",
    "Example difficulty",
    "Provenance",
]


@pytest.fixture(scope="module")
def full_run(trained_run, tmp_path_factory):
    """Every stage of the demo, in tiny sizes, on a copy of the small trained run."""
    from roar.stages import curves, extract, metrics
    from roar.stages.insecurity import stage as insecurity
    from roar.stages.retrain import sweep
    from roar.stages.vog import stage as vog

    sets = [
        "retrain.methods=[ground_truth, random]",
        "retrain.thresholds=[50]",
        "curves.max_images=24",
        "curves.steps=[0, 0.5, 1]",
        "metrics.max_images=12",
        "metrics.metrics=[relevance_mass, auc, sparseness, max_sensitivity]",
        "insecurity.images=hard",
        "vog.grid_classes=2",
        "vog.grid_k=3",
        "report.classes=3",
    ]
    cfg, _ = run_copy(trained_run, tmp_path_factory.mktemp("report"), "run", sets)
    extract.run(cfg)
    sweep.run(cfg, ["roar", "kar"])
    curves.run(cfg)
    vog.run(cfg)
    insecurity.run(cfg)
    metrics.run(cfg)
    return cfg, stage.run(cfg, "configs/smoke.yaml")


def _markdown_images(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def test_every_stage_of_a_full_run_is_reported(full_run):
    cfg, result = full_run
    out = cfg.run_dir / "report"
    assert result["sections"] == SECTIONS
    assert result["not_run"] == []
    html = (out / "index.html").read_text()
    for title in SECTIONS:
        assert f">{title}</h2>" in html
    for phrase in ("mean rank", "Kendall τ", "Accuracy against threshold", "ROAD", "VoG", "Insecurity maps"):
        assert phrase in html, phrase
    assert "not run" not in html
    assert (out / "config.yaml").exists() and (out / "provenance.json").exists()
    assert str(out / "index.html") in result.summary()


def test_every_image_the_markdown_references_exists_and_the_html_embeds_them(full_run):
    cfg, result = full_run
    out = cfg.run_dir / "report"
    images = _markdown_images((out / "index.md").read_text())
    assert len(images) == result["figures"] >= 8
    for ref in images:
        assert (out / ref).is_file(), ref
    html = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == len(images)
    for src in sources:
        kind, data = re.match(r"data:image/(svg\+xml|png);base64,(.+)", src).groups()
        raw = base64.b64decode(data)
        assert raw.startswith(b"\x89PNG") if kind == "png" else b"<svg" in raw[:2000]
    assert not re.search(r'(src|href)="(https?:)?//', html)


def test_the_markdown_tables_parse_with_as_many_cells_as_columns(full_run):
    cfg, _ = full_run
    tokens = MarkdownIt("commonmark").enable("table").parse((cfg.run_dir / "report" / "index.md").read_text())
    tables, widths, row = 0, [], 0
    for token in tokens:
        if token.type == "table_open":
            tables += 1
        elif token.type == "tr_open":
            row = 0
        elif token.type in ("th_open", "td_open"):
            row += 1
        elif token.type == "tr_close":
            widths.append(row)
        elif token.type == "table_close":
            assert len(set(widths)) == 1, widths  # every row as wide as the header
            widths = []
    assert tables >= 6


def test_the_html_loads_in_chromium_without_errors_or_requests(full_run, tmp_path):
    require_chromium()
    cfg, _ = full_run
    visit = open_page(cfg.run_dir / "report" / "index.html", tmp_path / "first_screen.png")
    assert visit.console_errors == []
    assert visit.requests == []
    assert visit.title == f"roar report: {cfg.name}"
    assert not is_blank(visit.screenshot)


def test_markdown_to_writes_a_copy_with_its_own_figures(full_run, tmp_path):
    cfg, _ = full_run
    target = tmp_path / "docs" / "results.md"
    target.parent.mkdir()
    result = stage.run(cfg, "configs/smoke.yaml", markdown_to=target)
    images = _markdown_images(target.read_text())
    assert images and all(ref.startswith("results/") for ref in images)
    assert all((target.parent / ref).is_file() for ref in images)
    assert str(target) in result.summary()


def test_a_partial_run_lists_what_has_not_run_with_the_command(trained_run, tmp_path):
    cfg, _ = run_copy(trained_run, tmp_path, "partial")
    result = stage.run(cfg, "configs/smoke.yaml")
    assert result["sections"] == SECTIONS
    assert "Maps" in result["not_run"] and "ROAR and KAR" in result["not_run"]
    assert "Run" not in result["not_run"] and "Provenance" not in result["not_run"]
    html = (cfg.run_dir / "report" / "index.html").read_text()
    assert "roar extract --config configs/smoke.yaml" in html
    assert "roar retrain --config configs/smoke.yaml" in html
    for ref in _markdown_images((cfg.run_dir / "report" / "index.md").read_text()):
        assert (cfg.run_dir / "report" / ref).is_file()


def test_no_run_is_refused_and_nothing_is_written(trained_run, tmp_path):
    cfg, _ = run_copy(trained_run, tmp_path, "empty")
    import shutil

    shutil.rmtree(cfg.run_dir / "train")
    with pytest.raises(RoarError, match="no run at"):
        stage.run(cfg, "configs/smoke.yaml")
    assert not (cfg.run_dir / "report").exists()


# ------------------------------------------------------------------------------------------------ trust


def _measures(values: dict[str, dict[str, float]]) -> trust.Measures:
    return trust.Measures(values, {m: "metrics" for m in values})


def test_ranks_consensus_and_agreement_by_hand():
    measures = _measures(
        {
            "a": {"x": 3.0, "y": 2.0, "z": 1.0},  # x ≻ y ≻ z
            "b": {"x": 2.0, "y": 3.0, "z": 1.0},  # y ≻ x ≻ z
            "c": {"x": 1.0, "y": 1.0, "z": 0.0},  # x = y ≻ z
        }
    )
    methods, names, rank = trust.ranks(measures)
    assert methods == ["x", "y", "z"] and names == ["a", "b", "c"]
    assert np.array_equal(rank, [[1, 2, 1.5], [2, 1, 1.5], [3, 3, 3]])
    assert [(m, r) for m, r, _ in trust.consensus(methods, names, rank)] == [("x", 1.5), ("y", 1.5), ("z", 3.0)]
    assert trust.consensus(methods, names, rank, {"b"})[0][0] == "y"
    labels, tau = trust.tau_matrix(measures)
    from scipy.stats import kendalltau

    assert tau[0, 1] == pytest.approx(kendalltau([3, 2, 1], [2, 3, 1]).statistic)
    assert tau[0, 0] == 1.0


def test_findings_are_sentences_computed_from_the_numbers():
    measures = _measures({"a": {"x": 3.0, "y": 2.0, "z": 1.0}, "b": {"x": 2.0, "y": 3.0, "z": 1.0}})
    sentences = trust.findings(measures, {"b": 0.9}, {"z": 0.97})
    text = " ".join(sentences)
    assert "Across 2 measures of 3 methods" in text and "**z** comes last (3.0)" in text
    assert "taken alone, rank **y** first" in text  # the trusted measure alone
    assert "the overall consensus, **x**, rests on measures that do not" in text
    assert "median Kendall τ" in text and "0.33" in text
    assert "**z** barely change" in text
    assert trust.findings(_measures({}), {}, {}) == []


def test_the_templates_escape_html_and_keep_markdown_tables_whole():
    from roar.stages.report import render

    sections = [Section("A <b>", [Text("x < y and **bold** `c|d`"), Table(["k", "v|w"], [["<i>", "1|2"]])])]
    page = render.render_html("t", sections, "f")
    assert "A &lt;b&gt;" in page and "<strong>bold</strong>" in page and "&lt;i&gt;" in page
    md = render.render_markdown("t", sections, "f", "figures")
    assert "| k | v\\|w |" in md and "| <i> | 1\\|2 |" in md


def test_report_cli_refuses_a_missing_run(repo, tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "roar", "report", "-c", "configs/smoke.yaml", "-s", f"output_dir={tmp_path / 'x'}"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: no run at")
    assert not (tmp_path / "x").exists()


def test_figure_names_must_be_unique():
    from roar.stages.report import render
    from roar.stages.report.document import Figure

    sections = [Section("A", [Figure("same", "<svg/>", ".svg")]), Section("B", [Figure("same", "<svg/>", ".svg")])]
    with pytest.raises(ValueError, match="share a file name: same.svg"):
        render.all_figures(sections)


def test_document_anchor_and_number_format():
    from roar.stages.report.document import fmt

    assert Section("Which method to trust").anchor == "which-method-to-trust"
    assert fmt(0.12345) == "0.123" and fmt(3) == "3" and fmt(float("nan")) == "–" and fmt(None) == "–"
    assert fmt(1.7e-16, 2) == "0.00" and fmt(2.3e-17, 3, scientific=True) == "2.3e-17"
