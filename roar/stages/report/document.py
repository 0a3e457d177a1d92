"""What a report is made of: sections of blocks, rendered alike to HTML and to markdown.

A section knows nothing of either format. It holds text, tables, figures and code; the templates
(``templates/report.html.j2``, ``templates/report.md.j2``) decide how each kind of block looks.
A section whose stage has not run holds no blocks but the command that runs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Text:
    """A paragraph. ``**bold**`` and `` `code` `` are the only markup, valid in both formats."""

    text: str
    kind: str = "text"


@dataclass
class Table:
    """A table of already formatted cells; ``caption`` says what it shows."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    kind: str = "table"


@dataclass
class Figure:
    """An image: ``data`` is SVG text (``suffix`` ".svg") or PNG bytes (".png"); ``name`` is its file stem."""

    name: str
    data: str | bytes
    suffix: str
    caption: str = ""
    kind: str = "figure"

    @property
    def filename(self) -> str:
        return f"{self.name}{self.suffix}"


@dataclass
class Code:
    """Preformatted text (a config, a list of versions)."""

    text: str
    language: str = ""
    kind: str = "code"


@dataclass
class Section:
    """One part of the report; ``missing`` is the command that would produce it when its stage has not run."""

    title: str
    blocks: list = field(default_factory=list)
    missing: str | None = None
    subsections: list[Section] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")

    def figures(self) -> list[Figure]:
        """Every figure of this section and its subsections."""
        own = [b for b in self.blocks if isinstance(b, Figure)]
        return own + [f for s in self.subsections for f in s.figures()]


def not_run(title: str, command: str, why: str = "not run") -> Section:
    """The section of a stage without results: the reason and the command that produces them."""
    return Section(title, [Text(f"{why[0].upper()}{why[1:]}: `{command}` produces it.")], missing=command)


def fmt(value, digits: int = 3, scientific: bool = False) -> str:
    """A number for a table: fixed digits, integers as integers, missing as an en dash; with
    ``scientific``, a value too small to show in fixed digits (a p-value) as 1.2e-17."""
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number:  # NaN
        return "–"
    if scientific and 0 < abs(number) < 0.5 * 10**-digits:
        return f"{number:.1e}"
    return f"{number:.{digits}f}"
