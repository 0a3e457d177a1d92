"""``results.csv`` of a ROAR/KAR sweep: one row per finished retraining, shared by the shards of a sweep.

Every row names the inputs it was computed from in its ``inputs`` column: a short hash of a nested
dict (the content digests of the method's train and test maps, the base model the maps come from,
the dataset's fingerprint, the model, the retraining recipe, the fill, the granularity and the
seed), whose full text is kept in ``inputs.json`` beside it (hash → dict) so that a rerun can say
*what* changed. A rerun keeps only the rows whose inputs are today's (``prune``): the others are
removed and, if the sweep still asks for them, recomputed.

Shards append under the file's own lock (``roar.core.locks``, blocking: they take turns); every
change to the file is made under that lock, and a rewrite replaces the file atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

from roar.core.atomic import write_text_atomic
from roar.core.locks import FileLock
from roar.core.provenance import fingerprint, write_json
from roar.core.tables import csv_text

KEY = ["mode", "method", "threshold", "seed"]
COLUMNS = [*KEY, "test_accuracy", "test_loss", "epochs", "seconds", "inputs"]
INPUTS = "inputs.json"


def row_key(row: dict) -> tuple[str, str, str, str]:
    return tuple(str(row[c]) for c in KEY)


def _parse(text: str) -> tuple[list[str], list[dict]]:
    reader = csv.DictReader(io.StringIO(text))
    rows = [row for row in reader if row.get("seconds") not in (None, "")]  # a torn last line: a kill mid-append
    return list(reader.fieldnames or []), rows


def read_results(path: Path) -> list[dict]:
    """The rows of ``results.csv`` (a torn last line is ignored); [] if there is none."""
    return _parse(path.read_text())[1] if path.exists() else []


def recorded_inputs(path: Path) -> dict[str, dict]:
    """``inputs.json`` beside ``results.csv``: the inputs of every hash a row names ({} if unreadable)."""
    try:
        data = json.loads((path.parent / INPUTS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(path: Path, inputs: dict) -> str:
    """The hash of ``inputs``, recorded in ``inputs.json`` (call under the results lock)."""
    key = fingerprint(inputs)
    known = recorded_inputs(path)
    if key not in known:
        write_json(path.parent / INPUTS, {**known, key: inputs})
    return key


def prune(path: Path, current: Callable[[tuple], dict | None]) -> tuple[list[dict], list[tuple[dict, dict | None]]]:
    """Remove the rows whose recorded inputs are not today's; returns (kept rows, [(removed row, its
    recorded inputs or None)]).

    ``current(key)`` is today's inputs for a row's (mode, method, threshold, seed), or None when
    they cannot be had (the method's maps are no longer stored): such rows are removed too. A file
    written before rows recorded their inputs loses every row.
    """
    with FileLock(path, blocking=True):
        if not path.exists():
            return [], []
        header, rows = _parse(path.read_text())
        known = recorded_inputs(path)
        kept, removed = [], []
        for row in rows:
            now = current(row_key(row))
            if now is not None and row.get("inputs") == fingerprint(now):
                kept.append(row)
            else:
                removed.append((row, known.get(row.get("inputs") or "")))
        if removed or header != COLUMNS:
            write_text_atomic(path, csv_text(kept, COLUMNS))
        return kept, removed


def append_result(path: Path, row: dict, inputs: dict) -> bool:
    """Append one row (with the hash of its ``inputs``) under the file's lock, fsynced; shards share the
    file and take turns. A row already there with the same key and inputs (computed meanwhile by a
    process sharing the sweep) is not added twice: returns False."""
    with FileLock(path, blocking=True):
        row = {**row, "inputs": _remember(path, inputs)}
        if any(row_key(r) == row_key(row) and r.get("inputs") == row["inputs"] for r in read_results(path)):
            return False
        with open(path, "a+", newline="") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                f.write(",".join(COLUMNS) + "\n")
            else:  # a line torn by a kill would otherwise merge with this one
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":
                    f.write("\n")
            csv.writer(f, lineterminator="\n").writerow([row[c] for c in COLUMNS])
            f.flush()
            os.fsync(f.fileno())
        return True
