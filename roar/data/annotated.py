"""Reading the annotation files of datasets that ship their labels as text tables (``cub200``,
``ade20k``): one converter per column, every malformed line a one-line error naming the file, the
line and the layout expected."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from roar.core.errors import RoarError
from roar.data.base import not_a_file


def read_table(path: Path, columns: tuple[Callable[[str], Any], ...], layout: str) -> Iterator[tuple[int, tuple]]:
    """(line number, converted fields) of every non-blank line of ``path``.

    A line holds ``len(columns)`` whitespace-separated fields, the last taking the rest of the line
    (so names with spaces, such as CUB's 'left eye', stay whole). A line that does not fit is a
    RoarError naming the file, the line and the expected ``layout``.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split(None, len(columns) - 1)
            if not fields:
                continue
            try:
                if len(fields) != len(columns):
                    raise ValueError
                row = tuple(convert(field.strip()) for convert, field in zip(columns, fields))
            except ValueError:
                raise RoarError(f"{path} line {number}: expected '{layout}', got '{shorten(line.strip())}'") from None
            yield number, row


def word(text: str) -> str:
    """A field of ``read_table`` that is one token (a name or path), not the rest of a longer line."""
    if not text or any(c.isspace() for c in text):
        raise ValueError(text)
    return text


def flag(text: str) -> int:
    """A field of ``read_table`` that is 0 or 1."""
    if text not in ("0", "1"):
        raise ValueError(text)
    return int(text)


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dataset_folder(root: Path, inner: str, marker: str, layout: str) -> Path:
    """``<root>/<inner>`` if it holds ``marker``, else ``root`` itself if it does (the user pointed at
    the inner folder); otherwise a RoarError naming ``dataset.root`` and the expected ``layout``."""
    root = Path(root)
    not_a_file(root, "dataset.root", f"expected {layout}")
    if not root.is_dir():
        raise RoarError(f"dataset.root {root} not found: expected {layout}")
    for folder in (root / inner, root):
        if (folder / marker).is_file():
            return folder
    raise RoarError(f"dataset.root {root} holds no {inner}/{marker}: expected {layout}")


def read_mapping(
    path: Path, columns: tuple[Callable[[str], Any], Callable[[str], Any]], layout: str, what: str
) -> dict:
    """{key: value} of a two-column table; a key given twice is an error naming ``what`` it is."""
    table: dict = {}
    for number, (key, value) in read_table(path, columns, layout):
        if key in table:
            raise RoarError(f"{path} line {number}: {what} {key} is given twice")
        table[key] = value
    return table
