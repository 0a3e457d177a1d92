"""What a store file is: its encoding of arrays, its chunk size, its names and its header.

* **Precision.** Arrays are kept as float16 ``a / scale`` with a float32 per-image
  ``scale = max |a|`` (0 stored as 1 so zeros stay zeros): the relative error is at most 2^-11 of
  the image's largest value, and tiny values such as squared gradients (1e-24) do not underflow.
* **Chunks.** Each array set is chunked along N into pieces of about ``CHUNK_BYTES``; a chunk is
  also the unit of staging and of resumption. ``chunk_rows_for`` reads ``CHUNK_BYTES`` from this
  module when called, so tests can shrink chunks by patching this one name.
* **Header.** File attributes describe the store: the fields every store has (``FIELDS``), the
  caller's own store-wide identity (``identity``, JSON), the command that recreates the file
  (``rerun``), provenance and ``roar_version``. Each array set ``maps/<name>`` carries its
  caller-given identity (``identity``, JSON) and ``rows_done``.

Format version 1 files were written when the store only held attribution maps: their header had
``reduction`` and ``target`` attributes instead of ``identity``, each array set had ``method`` and
``params`` instead of ``identity``, and there was no ``rerun``. ``store_identity`` and the readers
in ``roar.store.hdf5`` present those files in today's terms, so they read, resume and extend as
before. The format name predates the generic store and is kept so every roar version recognises
the files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "roar-attributions"
FORMAT_VERSION = 2
CHUNK_BYTES = 512 * 1024  # target size of one chunk (and one write unit) of an array set
COMPRESSIONS = ("lzf", "gzip", None)
# Header fields every store has and a resumed writer must agree on, in the order they are checked;
# the caller's identity is checked after the model hash, ``channels`` last.
FIELDS = ("split", "n", "geometry", "dataset", "dataset_fingerprint", "model_hash")
JSON_ATTRS = ("geometry", "provenance", "identity")
# What format version 1 kept in the header as the store-wide identity.
V1_IDENTITY = ("reduction", "target")
# Keys of ``MapStore.method_info`` that an array set's identity cannot use.
RESERVED = ("rows_done", "n", "complete")
ROWS = ("labels", "predictions", "indices")
EXTRA_DTYPES = ("int64", "float32", "bool")
GENERIC_RERUN = "the stage that wrote it"

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
CHUNK_FILE = re.compile(r"^(\d{12})\.npz$")


# ------------------------------------------------------------------------------------- arrays and chunks


def chunk_rows_for(row_bytes: int, n: int) -> int:
    """Rows per chunk so that a chunk is about ``CHUNK_BYTES`` (one row if a row is bigger), within [1, n]."""
    return int(min(max(1, CHUNK_BYTES // max(1, row_bytes)), max(1, n)))


def map_shape(geometry, channels: bool) -> tuple[int, ...]:
    """The shape of one stored map: (C, H, W) with channels kept, else (H, W)."""
    c, h, w = (int(x) for x in geometry)
    return (c, h, w) if channels else (h, w)


def staging_path(path: str | Path) -> Path:
    """The sidecar directory that holds finished chunks until they are consolidated."""
    path = Path(path)
    return path.with_name(path.name + ".staging")


def quantize(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float16 ``a / scale`` and float32 per-image ``scale = max |a|`` (1 for an all-zero map)."""
    maps = np.asarray(maps, dtype=np.float32)
    k = maps.shape[0]
    scale = np.abs(maps.reshape(k, -1)).max(axis=1) if maps.size else np.ones(k, np.float32)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    return (maps / scale.reshape((k,) + (1,) * (maps.ndim - 1))).astype(np.float16), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 maps from their float16 quotients and per-image scales."""
    return q.astype(np.float32) * np.asarray(scale, np.float32).reshape((len(q),) + (1,) * (q.ndim - 1))


def numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------------ JSON


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=json_default)


def normalise(value: Any) -> Any:
    """JSON round trip, so tuples compare equal to lists and numpy scalars to Python ones."""
    return json.loads(dumps(value))


# ---------------------------------------------------------------------------------------------- header


def store_identity(header: dict) -> dict:
    """The caller's store-wide identity recorded in a header (or staging manifest) of any format version."""
    if "identity" in header:
        return dict(header["identity"] or {})
    return {key: header[key] for key in V1_IDENTITY if key in header}


def current_header(header: dict) -> dict:
    """A stored header in today's layout: version 1's identity attributes folded into ``identity``."""
    out = {key: value for key, value in header.items() if key not in V1_IDENTITY or "identity" in header}
    out["identity"] = store_identity(header)
    out["format_version"] = FORMAT_VERSION
    return out


def rerun_hint(hint: str | None) -> str:
    """What to run to recreate or complete a store: the writer's command, or a generic wording."""
    return hint or GENERIC_RERUN


# ------------------------------------------------------------------------------------------------ text


def short(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) > 15 else text


def geometry_text(geometry) -> str:
    return "x".join(str(int(x)) for x in geometry)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def value_text(value: Any) -> str:
    """A stored value as messages quote it: strings bare, anything else as JSON."""
    return value if isinstance(value, str) else dumps(value)


def extras_spec(extras: dict | None) -> dict[str, dict]:
    """``{name: {"dtype", "shape"}}`` of the per-row arrays a store keeps beside labels, predictions
    and indices (``{"top": ("int64", (5,))}``: five ints per image); ValueError for a bad spec."""
    spec = {}
    for name, (dtype, shape) in (extras or {}).items():
        if not NAME.match(name) or name in ROWS:
            raise ValueError(
                f"extra row array name '{name}' must use letters, digits and _ . + - and not be one of {ROWS}"
            )
        if str(dtype) not in EXTRA_DTYPES:
            raise ValueError(f"extra row array '{name}': dtype must be one of {EXTRA_DTYPES}, got {dtype!r}")
        spec[name] = {"dtype": str(dtype), "shape": [int(x) for x in shape]}
    return spec


def extras_of(header: dict) -> dict[str, dict]:
    """The extra row arrays a store's header declares (none for stores without them)."""
    return dict((header.get("identity") or {}).get("extras") or {})
