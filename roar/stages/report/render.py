"""The report's two renderings: one self-contained HTML file and markdown with its figures beside it.

HTML: every figure is a ``data:`` URI (SVG stays vector, PNG stays PNG), the style sheet is inline
and there is no script, so the file opens offline, from an e-mail attachment, and requests nothing.
Markdown: the same sections, figures written to a folder next to it and linked relatively, for a
paper's supplement, a wiki, or ``docs/results.md``.
"""

from __future__ import annotations

import base64
import html
import re
from functools import cache
from pathlib import Path

from roar.core.atomic import replace_atomic
from roar.stages.report.document import Figure, Section

MIME = {".svg": "image/svg+xml", ".png": "image/png"}


def _inline_html(text: str) -> str:
    """``**bold**`` and `` `code` `` of a Text block as HTML, everything else escaped."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def _cell_md(text: str) -> str:
    """A markdown table cell: pipes escaped, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def data_uri(figure: Figure) -> str:
    data = figure.data.encode() if isinstance(figure.data, str) else figure.data
    return f"data:{MIME[figure.suffix]};base64,{base64.b64encode(data).decode()}"


@cache
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("roar.stages.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["inline_html"] = lambda text: jinja2.filters.Markup(_inline_html(text))
    env.filters["cell_md"] = _cell_md
    env.filters["data_uri"] = data_uri
    return env


def render_html(title: str, sections: list[Section], footer: str) -> str:
    return _environment().get_template("report.html.j2").render(title=title, sections=sections, footer=footer)


def render_markdown(title: str, sections: list[Section], footer: str, figures: str) -> str:
    """Markdown linking its figures as ``<figures>/<name>``, relative to the markdown file."""
    text = (
        _environment()
        .get_template("report.md.j2")
        .render(title=title, sections=sections, footer=footer, figures=figures)
    )
    text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def all_figures(sections: list[Section]) -> list[Figure]:
    figures = [f for s in sections for f in s.figures()]
    names = [f.filename for f in figures]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two figures of the report share a file name: {', '.join(duplicates)}")
    return figures


def write_figures(sections: list[Section], folder: Path) -> list[Path]:
    """Write every figure into ``folder`` (made if needed); returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for figure in all_figures(sections):
        data = figure.data.encode() if isinstance(figure.data, str) else figure.data
        path = folder / figure.filename
        replace_atomic(path, lambda f, data=data: f.write(data))
        paths.append(path)
    return paths
