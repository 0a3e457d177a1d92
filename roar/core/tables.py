"""CSV tables, written and read the same way by every stage: one header, floats to six significant
digits, the file replaced atomically (a killed run never leaves half a table), read back as a
list of dicts of strings."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from roar.core.atomic import write_text_atomic


def format_value(value) -> str:
    """A cell's text: floats to six significant digits ("nan" for NaN), anything else as ``str``."""
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def csv_text(rows: Iterable[dict], columns: Sequence[str] | None = None) -> str:
    """The CSV text of ``rows``; ``columns`` default to every key, in order of first appearance."""
    rows = list(rows)
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: format_value(row.get(k, "")) for k in columns} for row in rows)
    return buffer.getvalue()


def write_csv(path: str | Path, rows: Iterable[dict], columns: Sequence[str] | None = None) -> None:
    write_text_atomic(path, csv_text(rows, columns))


def read_csv(path: str | Path) -> list[dict]:
    """The rows of a CSV file as dicts of strings; [] when the file does not exist."""
    path = Path(path)
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []
