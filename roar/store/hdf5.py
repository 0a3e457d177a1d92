"""The consolidated HDF5 file: opening it safely, reading its header and array sets, writing them.

Only complete files ever exist under a store's name (``roar.store.writer`` builds them under a
temporary name and renames them into place), so anything that does not open cleanly, is not a
roar store, is from a newer roar or lacks the ``complete`` flag is reported as a one-line
RoarError, never as an h5py traceback.

Layout: ``maps/<name>`` float16 [N, H, W] (or [N, C, H, W] with ``channels``), chunked along N
and compressed; ``scales/<name>`` float32 [N]; ``labels``, ``predictions``, ``indices`` int64 [N];
file attributes as described in ``roar.store.format``. Both groups keep insertion order, which is
the order ``MapStore.methods`` lists the array sets in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from roar.core.errors import RoarError
from roar.store.format import FORMAT, FORMAT_VERSION, JSON_ATTRS, dumps, first_line, json_default, rerun_hint


def damaged(path: Path, exc: BaseException, rerun: str | None = None) -> RoarError:
    return RoarError(
        f"{path} is damaged or not an HDF5 file ({first_line(exc)}); delete it and rerun {rerun_hint(rerun)} "
        "to recreate it"
    )


def open_h5(path: Path, rerun: str | None = None) -> h5py.File:
    """The store's HDF5 file, read-only; a damaged or foreign file is a RoarError."""
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise damaged(path, exc, rerun) from None
    try:
        fmt = f.attrs.get("format")
        version = f.attrs.get("format_version")
        complete = f.attrs.get("complete", False)
    except Exception as exc:
        f.close()
        raise damaged(path, exc, rerun) from None
    if fmt != FORMAT:
        f.close()
        raise RoarError(f"{path} is an HDF5 file but not a roar array store; delete it or use another path")
    if int(version) > FORMAT_VERSION:
        f.close()
        raise RoarError(f"{path} has store format {int(version)}, this roar reads up to {FORMAT_VERSION}; upgrade roar")
    if not complete:  # never happens to files the writer renames into place
        f.close()
        raise damaged(path, ValueError("not completely written"), rerun)
    return f


def attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def read_header(path: Path, f: h5py.File, rerun: str | None = None) -> dict:
    """Every file attribute, JSON ones decoded."""
    try:
        header = {key: attr(value) for key, value in f.attrs.items()}
        for key in JSON_ATTRS:
            if key in header:
                header[key] = json.loads(header[key])
    except Exception as exc:
        raise damaged(path, exc, rerun) from None
    return header


def set_identity(attrs: h5py.AttributeManager) -> dict:
    """An array set's identity: ``identity`` (JSON), or format version 1's ``method`` and ``params``."""
    if "identity" in attrs:
        return json.loads(attr(attrs["identity"]))
    return {"method": attr(attrs["method"]), "params": json.loads(attr(attrs["params"]))}


def read_sets(path: Path, f: h5py.File, rerun: str | None = None) -> dict[str, dict]:
    """Every array set in the file: {name: {"identity", "rows_done"}}, in stored order."""
    try:
        group = f.get("maps")
        if group is None:
            return {}
        return {
            name: {"identity": set_identity(ds.attrs), "rows_done": int(ds.attrs["rows_done"])}
            for name, ds in group.items()
        }
    except Exception as exc:
        raise damaged(path, exc, rerun) from None


def write_header(f: h5py.File, header: dict) -> None:
    for key, value in header.items():
        if value is None:
            continue
        f.attrs[key] = json.dumps(value, default=json_default) if key in JSON_ATTRS else value


class Digest:
    """The content digest of an array set: sha256 (16 hex digits) over its stored float16 values and
    float32 scales, chunk by chunk in row order. Written once when the set is consolidated; what a
    result computed from the set records, so that maps recomputed with new content are noticed."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def update(self, q: np.ndarray, scale: np.ndarray) -> None:
        self._hash.update(np.ascontiguousarray(q, dtype=np.float16).tobytes())
        self._hash.update(np.ascontiguousarray(scale, dtype=np.float32).tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()[:16]


def chunk_rows_of(maps: h5py.Dataset) -> int:
    """Rows per chunk of a stored map set: its HDF5 chunks, or for a set stitched from shards (a
    virtual dataset, which has no chunks of its own) the shards' common ``chunk_rows``."""
    if maps.chunks:
        return int(maps.chunks[0])
    return int(maps.attrs.get("chunk_rows", max(1, len(maps))))


def set_digest(maps: h5py.Dataset, scales: h5py.Dataset) -> str:
    """An array set's content digest: the one written at consolidation, or computed from the data
    (files written before digests were recorded)."""
    if "digest" in maps.attrs:
        return attr(maps.attrs["digest"])
    digest = Digest()
    step = chunk_rows_of(maps)
    for start in range(0, len(maps), step):
        digest.update(maps[start : start + step], scales[start : start + step])
    return digest.hexdigest()


def write_set_attrs(ds: h5py.Dataset, identity: dict, rows_done: int) -> None:
    """Today's attributes of an array set; version 1's ``method`` and ``params`` are dropped when copied."""
    for key in ("method", "params"):
        if key in ds.attrs:
            del ds.attrs[key]
    ds.attrs.update({"identity": dumps(identity), "rows_done": rows_done})
