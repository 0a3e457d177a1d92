"""``roar report``: one page of a run, as a self-contained HTML file and as markdown.

Reads what the stages left in ``runs/<name>/`` (nothing is recomputed but the maps section's
pictures) and writes ``runs/<name>/report/``: ``index.html`` (figures embedded), ``index.md`` with
``figures/`` beside it, ``config.yaml`` and ``provenance.json``. ``markdown_to`` also writes the
markdown to another path, its figures into a folder named after it (``docs/results.md`` →
``docs/results/``), so a repository's results page is generated, never pasted.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from roar import __version__
from roar.config import RunConfig
from roar.core.atomic import write_text_atomic
from roar.core.errors import RoarError
from roar.core.locks import output_folder
from roar.core.provenance import record_run
from roar.core.schema import dump_yaml
from roar.data import build_dataset
from roar.stages.report import render, sections
from roar.stages.report.document import Section
from roar.stages.report.maps import maps_section
from roar.stages.result import StageResult


def build(cfg: RunConfig, config_path: str) -> list[Section]:
    """Every section, in reading order; a stage without results gives its "not run" section."""
    command = f"roar {{stage}} --config {config_path}"
    try:
        dataset = build_dataset(cfg.dataset)
    except RoarError as exc:  # the other sections read only the run's files
        dataset = str(exc)
    classes = None if isinstance(dataset, str) else dataset.num_classes
    return [
        sections.run_section(cfg, command),
        maps_section(cfg, command, dataset),
        sections.retrain_section(cfg, command, classes),
        sections.curves_section(cfg, command),
        sections.metrics_section(cfg, command),
        sections.trust_section(cfg, command),
        sections.difficulty_section(cfg, command),
        sections.provenance_section(cfg, command, dump_yaml(cfg)),
    ]


def _missing(section: Section) -> list[str]:
    own = [section.title] if section.missing else []
    return own + [f"{section.title}: {s.title}" for s in section.subsections if s.missing]


def run(cfg: RunConfig, config_path: str = "configs/demo.yaml", markdown_to: str | Path | None = None) -> StageResult:
    t0 = time.perf_counter()
    if not (cfg.run_dir / "train").is_dir():
        raise RoarError(f"no run at {cfg.run_dir}: train it first (roar train --config {config_path}, or task demo)")
    markdown_to = Path(markdown_to) if markdown_to is not None else None
    if markdown_to is not None and markdown_to.suffix != ".md":
        raise RoarError(f"--markdown-to {markdown_to}: expected a .md file")
    built = build(cfg, config_path)
    title = f"roar report: {cfg.name}"
    footer = f"Run `{cfg.name}` ({cfg.run_dir}), roar {__version__}, reported {time.strftime('%Y-%m-%d %H:%M %Z')}."
    render.all_figures(built)  # refuses clashing figure names before anything is written
    out = cfg.run_dir / "report"
    with output_folder(out):
        record_run(out, cfg, {})
        figures = out / "figures"
        if figures.exists():
            shutil.rmtree(figures)  # figures of an earlier report that this one may no longer have
        render.write_figures(built, figures)
        write_text_atomic(out / "index.md", render.render_markdown(title, built, footer, "figures"))
        write_text_atomic(out / "index.html", render.render_html(title, built, footer))
    if markdown_to is not None:
        folder = markdown_to.with_suffix("")
        if folder.exists():
            shutil.rmtree(folder)
        render.write_figures(built, folder)
        write_text_atomic(markdown_to, render.render_markdown(title, built, footer, folder.name))
    missing = [name for s in built for name in _missing(s)]
    summary = {
        "sections": [s.title for s in built],
        "not_run": missing,
        "figures": len(render.all_figures(built)),
        "html": str(out / "index.html"),
        "markdown": str(out / "index.md"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    line = f"report of {cfg.name}: {len(built)} sections"
    line += f" ({len(missing)} not run: {', '.join(missing)})" if missing else ", every stage reported"
    line += f" in {summary['seconds']:.0f} s -> {out / 'index.html'}"
    if markdown_to is not None:
        line += f" and {markdown_to}"
    return StageResult(summary, line)
