"""The attribution store: one HDF5 file per dataset split holding several methods' maps.

Every evaluation stage reads its maps from here, so the store guarantees three things:

* **Precision.** Maps are kept as float16 ``a / scale`` with a float32 per-image ``scale = max |a|``
  (0 stored as 1 so zeros stay zeros): the relative error is at most 2^-11 of the image's largest
  value, and tiny values such as squared gradients (1e-24) do not underflow.
* **Identity.** The file records what it was made from (split, size, geometry, dataset fingerprint,
  model hash, reduction, target, each method's parameters); resuming or reading with different
  inputs is refused with a one-line error naming the first difference.
* **Surviving SIGKILL at any moment.** HDF5 is not crash-safe: a process killed while the library
  writes metadata can leave a file that no longer opens, and a crashed SWMR writer leaves a flag
  that h5py cannot clear. So the HDF5 file is never modified in place. While maps are computed,
  every finished (method, chunk) goes to a sidecar directory ``<split>.h5.staging/`` as its own
  file, written to a temporary name, fsynced and renamed: a chunk file either exists whole or not
  at all, and its existence is the progress marker. ``finish()`` consolidates everything into a new
  HDF5 file under a temporary name and renames it over ``<split>.h5``, then deletes the staging
  directory. At every instant the HDF5 file is therefore either absent or a cleanly closed,
  complete file, and a resumed run recomputes exactly the chunks without a file. Readers refuse a
  store whose staging directory still holds methods that are not in the HDF5 file (unfinished).
  The price: consolidation writes the maps once more, and adding a method to a finished store
  rewrites the file (existing methods' compressed chunks are copied as they are). A hidden
  ``.<split>.h5.lock`` keeps two writers off the same store.

Layout of ``<split>.h5``: ``maps/<method>`` float16 [N, H, W] (or [N, C, H, W] with ``channels``),
chunked along N into pieces of about 512 KiB and compressed; ``scales/<method>`` float32 [N];
``labels``, ``predictions``, ``indices`` int64 [N]; file attributes describing the store (JSON
where not scalar) and per-method attributes ``method``, ``params`` (JSON) and ``rows_done``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import roar
from roar.atomic import replace_atomic
from roar.errors import RoarError
from roar.registry import closest

log = logging.getLogger(__name__)

FORMAT = "roar-attributions"
FORMAT_VERSION = 1
CHUNK_BYTES = 512 * 1024  # target size of one chunk (and one write unit) of a method's maps
TARGETS = ("predicted", "label")
COMPRESSIONS = ("lzf", "gzip", None)
# Fields a resumed writer must agree on, in the order they are checked.
IDENTITY = ("split", "n", "geometry", "dataset", "dataset_fingerprint", "model_hash", "reduction", "target", "channels")
JSON_ATTRS = ("geometry", "provenance")
# What recreates or completes a store; the same store format holds VoG's per-snapshot gradients.
RERUN = "the stage that writes it ('roar extract' for attribution maps, 'roar vog' for VoG gradients)"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_CHUNK_FILE = re.compile(r"^(\d{12})\.npz$")


# --------------------------------------------------------------------------------------------- helpers


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


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) > 15 else text


def _geometry_text(geometry) -> str:
    return "x".join(str(int(x)) for x in geometry)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _normalise(value: Any) -> Any:
    """JSON round trip, so tuples compare equal to lists and numpy scalars to Python ones."""
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_temporaries(folder: Path, prefix: str = ".") -> None:
    """Temporary files left by a killed writer (only ever touched while holding the store's lock)."""
    if folder.is_dir():
        for tmp in folder.glob(f"{prefix}*.tmp"):
            tmp.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------- identity checks


def _check_identity(where: Path, stored: dict, new: dict) -> None:
    """RoarError naming the first field in which an existing store differs from this run."""
    for key in IDENTITY:
        if _normalise(stored.get(key)) != _normalise(new[key]):
            raise RoarError(f"{where} {_mismatch(key, stored.get(key), new[key])}; delete it or use another output_dir")


def _mismatch(key: str, old: Any, new: Any) -> str:
    if key == "n":
        return f"was made for {old} images, this dataset split has {new}"
    if key == "geometry":
        return f"was made for geometry {_geometry_text(old)}, this dataset is {_geometry_text(new)}"
    if key == "dataset_fingerprint":
        return f"was made for dataset fingerprint {_short(old)}, this dataset is {_short(new)}"
    if key == "model_hash":
        return f"was made with model {_short(old)}, this model is {_short(new)}"
    if key == "channels":
        kept = {True: "channels kept", False: "channels reduced"}
        return f"was made with {kept[bool(old)]}, this run asks for {kept[bool(new)]}"
    return f"was made for {key.replace('_', ' ')} '{old}', this run asks for '{new}'"


def _check_params(where: Path, name: str, stored: dict, new: dict) -> None:
    """RoarError naming the method and the first parameter that differs."""
    if stored.get("method") != new.get("method"):
        raise RoarError(
            f"{where}: method '{name}' was computed by '{stored.get('method')}', this run asks for "
            f"'{new.get('method')}'; delete it or store the new method under another name"
        )
    old, cur = _normalise(stored.get("params") or {}), _normalise(new.get("params") or {})
    for key in sorted(set(old) | set(cur)):
        if old.get(key, "<unset>") != cur.get(key, "<unset>"):
            raise RoarError(
                f"{where}: method '{name}' was computed with {key}={old.get(key, '<unset>')!r}, this run asks for "
                f"{key}={cur.get(key, '<unset>')!r}; delete it or store the new setting under another method name"
            )


def _check_method_names(methods: dict[str, dict]) -> None:
    for name, spec in methods.items():
        if not _NAME.match(name):
            raise RoarError(f"attribution method name '{name}' must use only letters, digits and _ . + -")
        if not isinstance(spec, dict) or "method" not in spec:
            raise ValueError(f"methods['{name}'] must be a dict with 'method' and 'params'")


# ------------------------------------------------------------------------------------------- HDF5 file


def _damaged(path: Path, exc: BaseException) -> RoarError:
    return RoarError(
        f"{path} is damaged or not an HDF5 file ({_first_line(exc)}); delete it and rerun {RERUN} to recreate it"
    )


def _open_h5(path: Path) -> h5py.File:
    """The store's HDF5 file, read-only; a damaged or foreign file is a RoarError."""
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise _damaged(path, exc) from None
    try:
        fmt = f.attrs.get("format")
        version = f.attrs.get("format_version")
    except Exception as exc:
        f.close()
        raise _damaged(path, exc) from None
    if fmt != FORMAT:
        f.close()
        raise RoarError(f"{path} is an HDF5 file but not a roar attribution store; delete it or use another path")
    if int(version) > FORMAT_VERSION:
        f.close()
        raise RoarError(f"{path} has store format {int(version)}, this roar reads up to {FORMAT_VERSION}; upgrade roar")
    if not f.attrs.get("complete", False):  # never happens to files this module renames into place
        f.close()
        raise _damaged(path, ValueError("not completely written"))
    return f


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def _h5_header(path: Path, f: h5py.File) -> dict:
    try:
        header = {key: _attr(value) for key, value in f.attrs.items()}
        for key in JSON_ATTRS:
            if key in header:
                header[key] = json.loads(header[key])
    except Exception as exc:
        raise _damaged(path, exc) from None
    return header


def _h5_methods(path: Path, f: h5py.File) -> dict[str, dict]:
    """Every method in the file: {name: {"method", "params", "rows_done"}}, in stored order."""
    try:
        group = f.get("maps")
        if group is None:
            return {}
        return {
            name: {
                "method": _attr(ds.attrs["method"]),
                "params": json.loads(_attr(ds.attrs["params"])),
                "rows_done": int(ds.attrs["rows_done"]),
            }
            for name, ds in group.items()
        }
    except Exception as exc:
        raise _damaged(path, exc) from None


def _write_header(f: h5py.File, header: dict) -> None:
    for key, value in header.items():
        f.attrs[key] = json.dumps(value, default=_json_default) if key in JSON_ATTRS else value


# --------------------------------------------------------------------------------------------- staging


class _Staging:
    """The sidecar directory: ``store.json`` plus one atomically renamed file per finished chunk.

    ``maps/<method>/<start>.npz`` holds float16 quotients ``q`` and float32 ``scale`` of rows
    [start, start + chunk_rows); ``rows/<start>.npz`` holds their labels, predictions and indices.
    """

    def __init__(self, root: Path):
        self.root = root
        self.manifest_path = root / "store.json"

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text())
            if manifest.get("format") != FORMAT or not isinstance(manifest.get("methods"), dict):
                raise ValueError("not a roar staging manifest")
            return manifest
        except Exception as exc:
            raise RoarError(
                f"{self.manifest_path} is damaged ({_first_line(exc)}); delete {self.root} and rerun {RERUN}"
            ) from None

    def write_manifest(self, manifest: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(manifest, indent=2, default=_json_default).encode() + b"\n"
        replace_atomic(self.manifest_path, lambda f: f.write(text))
        _fsync_dir(self.root)

    def _folder(self, method: str | None) -> Path:
        return self.root / "rows" if method is None else self.root / "maps" / method

    def chunks(self, method: str | None) -> set[int]:
        """Starts of the chunks finished for ``method`` (None: the rows' labels and indices)."""
        folder = self._folder(method)
        if not folder.is_dir():
            return set()
        return {int(m.group(1)) for m in map(_CHUNK_FILE.match, os.listdir(folder)) if m}

    def save(self, method: str | None, start: int, **arrays: np.ndarray) -> None:
        folder = self._folder(method)
        folder.mkdir(parents=True, exist_ok=True)
        replace_atomic(folder / f"{start:012d}.npz", lambda f: np.savez(f, **arrays))

    def load(self, method: str | None, start: int) -> dict[str, np.ndarray]:
        with np.load(self._folder(method) / f"{start:012d}.npz", allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def discard(self, method: str | None, start: int) -> None:
        (self._folder(method) / f"{start:012d}.npz").unlink(missing_ok=True)

    def method_folders(self) -> list[str]:
        folder = self.root / "maps"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def remove_method(self, method: str) -> None:
        shutil.rmtree(self._folder(method), ignore_errors=True)

    def remove_temporaries(self) -> None:
        _remove_temporaries(self.root)
        for sub in ("rows", "maps"):
            folder = self.root / sub
            if folder.is_dir():
                for tmp in folder.rglob(".*.tmp"):
                    tmp.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _load_map(staging: _Staging, method: str, start: int, rows: int, shape: tuple[int, ...]) -> dict | None:
    """A staged chunk of maps, or None if the file is missing or unreadable."""
    try:
        data = staging.load(method, start)
    except Exception:
        return None
    if data.get("q") is None or data["q"].shape != (rows, *shape) or data.get("scale", np.empty(0)).shape != (rows,):
        return None
    return data


def _load_rows(staging: _Staging, start: int, rows: int) -> dict | None:
    try:
        data = staging.load(None, start)
    except Exception:
        return None
    if any(data.get(key, np.empty(0)).shape != (rows,) for key in ("labels", "predictions", "indices")):
        return None
    return data


def _live_manifest(staging: _Staging, consolidated: dict) -> dict | None:
    """The staging manifest, or None when there is none or every staged method is already consolidated."""
    if not staging.root.is_dir():
        return None
    manifest = staging.read_manifest()
    if manifest is not None and all(name in consolidated for name in manifest["methods"]):
        return None  # left over from a consolidation that finished but was killed before cleaning up
    return manifest


# ---------------------------------------------------------------------------------------------- writer


def _acquire_lock(path: Path) -> int:
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RoarError(f"another process is writing {path}; wait for it to finish or stop it") from None
    return fd


class StoreWriter:
    """Writes (or resumes, or extends) the attribution store of one split.

    ``methods`` maps the store name of each method to ``{"method": registered name or plug-in path,
    "params": {...}}``. Work proceeds in chunks of ``chunk_rows()`` rows: ``pending(method)`` lists
    the row ranges still to compute, ``write`` stores finished rows, ``finish`` consolidates.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        split: str,
        n: int,
        geometry: tuple[int, int, int],
        dataset: str,
        dataset_fingerprint: str,
        model_hash: str,
        reduction: str,
        target: str,
        channels: bool,
        methods: dict[str, dict],
        provenance: dict,
        compression: str | None = "lzf",
    ):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if int(n) < 1:
            raise RoarError(f"split '{split}' has no images; nothing to store in {path}")
        if len(tuple(geometry)) != 3:
            raise ValueError(f"geometry must be (C, H, W), got {geometry!r}")
        _check_method_names(methods)
        self.path = Path(path)
        self.compression = compression
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire_lock(self.path)
        try:
            self._setup(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "split": split,
                    "n": int(n),
                    "geometry": [int(x) for x in geometry],
                    "dataset": dataset,
                    "dataset_fingerprint": dataset_fingerprint,
                    "model_hash": model_hash,
                    "roar_version": roar.__version__,
                    "reduction": reduction,
                    "target": target,
                    "channels": bool(channels),
                    "provenance": _normalise(provenance),
                },
                {
                    name: {"method": spec["method"], "params": _normalise(spec.get("params") or {})}
                    for name, spec in methods.items()
                },
            )
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------------- setup

    def _setup(self, header: dict, requested: dict[str, dict]) -> None:
        self.staging = _Staging(staging_path(self.path))
        _remove_temporaries(self.path.parent, prefix=f".{self.path.name}.")
        self.staging.remove_temporaries()
        header, self.consolidated, self.h5_rows, chunk_rows = self._read_existing(header)
        manifest = _live_manifest(self.staging, self.consolidated)
        if manifest is None and self.staging.root.exists():
            self.staging.remove()
        if manifest is not None:
            _check_identity(self.staging.root, manifest, header)
            chunk_rows = chunk_rows or int(manifest["chunk_rows"])
            header = header if self.path.exists() else manifest
        for name, spec in requested.items():
            if name in self.consolidated:
                _check_params(self.path, name, self.consolidated[name], spec)
            elif manifest is not None and name in manifest["methods"]:
                _check_params(self.staging.root, name, manifest["methods"][name], spec)
        self.header = {key: value for key, value in header.items() if key not in ("complete", "chunk_rows", "methods")}
        self.n = int(self.header["n"])
        self.shape = map_shape(self.header["geometry"], self.header["channels"])
        self._chunk_rows = chunk_rows or chunk_rows_for(2 * int(np.prod(self.shape)), self.n)
        self._setup_staging(manifest, requested)

    def _read_existing(self, header: dict) -> tuple[dict, dict, dict | None, int | None]:
        """Header, methods, rows and chunk size of an existing consolidated file, checked against this run."""
        if not self.path.exists():
            return header, {}, None, None
        with _open_h5(self.path) as f:
            stored = _h5_header(self.path, f)
            _check_identity(self.path, stored, header)
            methods = _h5_methods(self.path, f)
            try:
                rows = {key: f[key][:] for key in ("labels", "predictions", "indices")}
                chunk_rows = f["maps"][next(iter(methods))].chunks[0] if methods else None
            except Exception as exc:
                raise _damaged(self.path, exc) from None
        return stored, methods, rows, chunk_rows

    def _setup_staging(self, manifest: dict | None, requested: dict[str, dict]) -> None:
        """Keep staged methods that are requested or already complete; drop partial leftovers of others."""
        starts = set(range(0, self.n, self._chunk_rows))
        kept = {}
        for name, spec in (manifest["methods"] if manifest else {}).items():
            if name in self.consolidated:
                continue
            if name in requested or starts <= self.staging.chunks(name):
                kept[name] = spec
            else:
                log.warning("%s: discarding the partial maps of '%s', which this run does not compute", self.path, name)
        staged = {**kept, **{n: s for n, s in requested.items() if n not in self.consolidated and n not in kept}}
        self.methods = {
            name: {"method": s["method"], "params": s["params"]} for name, s in {**self.consolidated, **staged}.items()
        }
        self._done = {name: set(starts) for name in self.consolidated}
        self._rows_done: set[int] = set()
        if not staged:
            return
        for folder in self.staging.method_folders():
            if folder not in kept:  # partial maps of a dropped method, or debris under a new method's name
                self.staging.remove_method(folder)
        self.staging.write_manifest({**self.header, "chunk_rows": self._chunk_rows, "methods": staged})
        self._rows_done = self.staging.chunks(None) & starts
        for name in staged:  # rows are staged before maps, so a chunk with maps but no rows was tampered with
            self._done[name] = self.staging.chunks(name) & (starts if self.h5_rows is not None else self._rows_done)

    # ---------------------------------------------------------------------------------- progress

    def chunk_rows(self) -> int:
        """Rows per chunk: every write covers whole chunks (the last one may be shorter)."""
        return self._chunk_rows

    def _chunk_end(self, start: int) -> int:
        return min(start + self._chunk_rows, self.n)

    def pending(self, method: str) -> list[tuple[int, int]]:
        """[start, stop) row ranges of ``method`` not yet written, in order, chunk-aligned."""
        if method not in self.methods:
            raise ValueError(f"unknown method '{method}' for {self.path}; known: {', '.join(self.methods)}")
        ranges: list[tuple[int, int]] = []
        for start in range(0, self.n, self._chunk_rows):
            if start in self._done[method]:
                continue
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], self._chunk_end(start))
            else:
                ranges.append((start, self._chunk_end(start)))
        return ranges

    def rows_done(self, method: str) -> int:
        return sum(self._chunk_end(start) - start for start in self._done[method])

    def complete(self) -> bool:
        return all(self.rows_done(name) == self.n for name in self.methods)

    # ---------------------------------------------------------------------------------- writing

    def write(self, start: int, maps: dict[str, Any], labels, predictions, indices) -> None:
        """Store rows [start, start + k) of the given methods; all are validated before anything lands."""
        self._check_open()
        given = {"labels": labels, "predictions": predictions, "indices": indices}
        rows = {key: _numpy(value).astype(np.int64).reshape(-1) for key, value in given.items()}
        k = len(rows["indices"])
        self._check_range(start, k, rows)
        quantized = {
            name: quantize(self._checked_maps(name, value, k, rows["indices"])) for name, value in maps.items()
        }
        pieces = [
            (chunk, chunk - start, self._chunk_end(chunk) - start)
            for chunk in range(start, start + k, self._chunk_rows)
        ]
        rows_of = {chunk: {key: value[a:b] for key, value in rows.items()} for chunk, a, b in pieces}
        new_rows = [chunk for chunk, _, _ in pieces if self._rows_are_new(chunk, rows_of[chunk])]  # checks all first
        for chunk, a, b in pieces:
            if chunk in new_rows:
                self.staging.save(None, chunk, **rows_of[chunk])
                self._rows_done.add(chunk)
            for name, (q, scale) in quantized.items():
                if chunk not in self._done[name]:  # a batch may overlap chunks finished before a restart
                    self.staging.save(name, chunk, q=q[a:b], scale=scale[a:b])
                    self._done[name].add(chunk)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the writer of {self.path} is closed")

    def _check_range(self, start: int, k: int, rows: dict) -> None:
        stop = start + k
        if any(len(value) != k for value in rows.values()):
            raise ValueError(
                f"labels, predictions and indices must have the same length, got {[len(v) for v in rows.values()]}"
            )
        if (
            k < 1
            or start < 0
            or stop > self.n
            or start % self._chunk_rows
            or (stop % self._chunk_rows and stop != self.n)
        ):
            raise ValueError(
                f"write of rows [{start}, {stop}) to {self.path}: rows must be whole chunks of "
                f"{self._chunk_rows} within [0, {self.n})"
            )

    def _checked_maps(self, name: str, value: Any, k: int, indices: np.ndarray) -> np.ndarray:
        if name not in self.methods:
            raise ValueError(f"unknown method '{name}' for {self.path}; known: {', '.join(self.methods)}")
        if name in self.consolidated:
            raise ValueError(f"method '{name}' is already complete in {self.path}")
        a = _numpy(value).astype(np.float32, copy=False)
        if not self.header["channels"] and a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        if a.shape != (k, *self.shape):
            layout = "[k, C, H, W]" if self.header["channels"] else "[k, H, W] or [k, 1, H, W]"
            raise RoarError(
                f"method '{name}' produced maps of shape {list(a.shape)}, expected {[k, *self.shape]} ({layout} for "
                f"geometry {_geometry_text(self.header['geometry'])})"
            )
        bad = ~np.isfinite(a.reshape(k, -1)).all(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            kind = "NaN" if np.isnan(a[row]).any() else "Inf"
            raise RoarError(f"method '{name}' produced {kind} at image index {int(indices[row])}")
        return a

    def _rows_are_new(self, chunk: int, rows: dict[str, np.ndarray]) -> bool:
        """True if the chunk's labels, predictions and indices are not stored yet; stored ones must agree."""
        a, b = chunk, self._chunk_end(chunk)
        if self.h5_rows is not None:
            known = {key: value[a:b] for key, value in self.h5_rows.items()}
        elif chunk in self._rows_done:
            known = _load_rows(self.staging, chunk, b - a)
        else:
            known = None
        if known is None:
            return True
        for key in ("indices", "labels"):
            if not np.array_equal(known[key], rows[key]):
                raise RoarError(
                    f"{self.path}: rows {a}-{b} were stored with other {key}; the dataset or its order changed "
                    f"since extraction started; delete it or use another output_dir"
                )
        changed = int((known["predictions"] != rows["predictions"]).sum())
        if changed:
            log.warning("%s: %d predictions in rows %d-%d differ from the stored ones", self.path, changed, a, b)
        return False

    # ---------------------------------------------------------------------------------- finishing

    def finish(self) -> None:
        """Consolidate into the HDF5 file if every method has every row; close either way."""
        try:
            if self._closed:
                return
            if not self.complete():
                left = ", ".join(
                    f"{name}: {self.rows_done(name)} of {self.n}"
                    for name in self.methods
                    if self.rows_done(name) < self.n
                )
                log.warning("%s stays unfinished (%s)", self.path, left)
            elif any(name not in self.consolidated for name in self.methods):
                self._consolidate()
                self.staging.remove()
        finally:
            self.close()

    def _consolidate(self) -> None:
        """Build the complete HDF5 file under a temporary name, fsync it, then rename it over the store."""
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as out:
                old = _open_h5(self.path) if self.consolidated else None
                try:
                    self._fill(out, old)
                finally:
                    if old is not None:
                        old.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)

    def _fill(self, out: h5py.File, old: h5py.File | None) -> None:
        _write_header(out, self.header)
        rows = self.h5_rows if self.h5_rows is not None else self._staged_rows()
        for key, value in rows.items():
            out.create_dataset(key, data=value, dtype=np.int64, compression=self.compression)
        maps, scales = out.create_group("maps", track_order=True), out.create_group("scales", track_order=True)
        for name in self.methods:
            if name in self.consolidated:
                out.copy(old["maps"][name], maps, name=name)
                out.copy(old["scales"][name], scales, name=name)
            else:
                self._fill_method(maps, scales, name)
        out.attrs["complete"] = True

    def _staged_rows(self) -> dict[str, np.ndarray]:
        parts = []
        for chunk in range(0, self.n, self._chunk_rows):
            data = _load_rows(self.staging, chunk, self._chunk_end(chunk) - chunk)
            if data is None:
                self.staging.discard(None, chunk)
                raise self._damaged_chunk(f"rows/{chunk:012d}.npz")
            parts.append(data)
        return {key: np.concatenate([p[key] for p in parts]) for key in ("labels", "predictions", "indices")}

    def _fill_method(self, maps: h5py.Group, scales: h5py.Group, name: str) -> None:
        compression = {"compression": self.compression, "shuffle": self.compression is not None}
        ds = maps.create_dataset(
            name, shape=(self.n, *self.shape), dtype=np.float16, chunks=(self._chunk_rows, *self.shape), **compression
        )
        sc = scales.create_dataset(name, shape=(self.n,), dtype=np.float32, compression=self.compression)
        for chunk in range(0, self.n, self._chunk_rows):
            end = self._chunk_end(chunk)
            data = _load_map(self.staging, name, chunk, end - chunk, self.shape)
            if data is None:
                self.staging.discard(name, chunk)
                raise self._damaged_chunk(f"maps/{name}/{chunk:012d}.npz")
            ds[chunk:end] = data["q"]
            sc[chunk:end] = data["scale"]
        spec = self.methods[name]
        ds.attrs.update({"method": spec["method"], "params": _dumps(spec["params"]), "rows_done": self.n})

    def _damaged_chunk(self, relative: str) -> RoarError:
        return RoarError(
            f"{self.staging.root / relative} was unreadable and has been removed; rerun {RERUN} to recompute it"
        )

    def close(self) -> None:
        """Release the store without consolidating (finished chunks stay staged for a later run)."""
        if self._closed:
            return
        self._closed = True
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        os.close(self._lock)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- reader


class _H5Maps:
    """A consolidated method: every row present in the HDF5 file."""

    def __init__(self, path: Path, f: h5py.File, name: str):
        self.path, self.maps, self.scales = path, f["maps"][name], f["scales"][name]
        self.rows_done = len(self.maps)

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            return dequantize(self.maps[start:stop], self.scales[start:stop])
        except Exception as exc:
            raise _damaged(self.path, exc) from None

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        step = self.maps.chunks[0] if self.maps.chunks else len(self.maps)
        for start in range(0, len(self.maps), step):
            yield start, self.read(start, min(start + step, len(self.maps)))


class _StagedMaps:
    """A method still in the staging directory: rows not yet computed read as NaN."""

    def __init__(self, staging: _Staging, name: str, n: int, chunk_rows: int, shape: tuple[int, ...]):
        self.staging, self.name, self.n, self.chunk_rows, self.shape = staging, name, n, chunk_rows, shape
        self.done = sorted(start for start in staging.chunks(name) if start < n and start % chunk_rows == 0)
        self.rows_done = sum(self._end(start) - start for start in self.done)

    def _end(self, start: int) -> int:
        return min(start + self.chunk_rows, self.n)

    def _chunk(self, start: int) -> np.ndarray | None:
        data = _load_map(self.staging, self.name, start, self._end(start) - start, self.shape)
        return None if data is None else dequantize(data["q"], data["scale"])

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.full((stop - start, *self.shape), np.nan, dtype=np.float32)
        for chunk in self.done:
            a, b = max(chunk, start), min(self._end(chunk), stop)
            if a < b and (maps := self._chunk(chunk)) is not None:
                out[a - start : b - start] = maps[a - chunk : b - chunk]
        return out

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for chunk in self.done:
            maps = self._chunk(chunk)
            if maps is not None:
                yield chunk, maps


class AttributionStore:
    """Reads the maps of one split. Open with ``AttributionStore.open(path)``."""

    def __init__(self, path: Path, header: dict, methods: dict[str, dict], sources: dict, h5, staging, rows):
        self.path = path
        self.attrs = header
        self._methods, self._sources, self._h5, self._staging, self._rows = methods, sources, h5, staging, rows
        self.n = int(header["n"])
        self.geometry = tuple(int(x) for x in header["geometry"])
        self.split = header["split"]
        self.channels = bool(header["channels"])
        self.methods = list(methods)

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> AttributionStore:
        """The store at ``path``; unless ``require_complete=False``, only if every method has every row."""
        path = Path(path)
        staging = _Staging(staging_path(path))
        h5 = _open_h5(path) if path.exists() else None
        try:
            return cls._build(path, h5, staging, require_complete)
        except BaseException:
            if h5 is not None:
                h5.close()
            raise

    @classmethod
    def _build(cls, path: Path, h5, staging: _Staging, require_complete: bool) -> AttributionStore:
        consolidated = _h5_methods(path, h5) if h5 is not None else {}
        manifest = _live_manifest(staging, consolidated)
        if h5 is None and manifest is None:
            raise RoarError(f"no attribution store at {path}; run {RERUN} first")
        header = _h5_header(path, h5) if h5 is not None else manifest
        header = {key: value for key, value in header.items() if key not in ("chunk_rows", "methods")}
        n, shape = int(header["n"]), map_shape(header["geometry"], header["channels"])
        sources: dict[str, Any] = {name: _H5Maps(path, h5, name) for name in consolidated}
        methods = {name: {**spec, "consolidated": True} for name, spec in consolidated.items()}
        for name, spec in (manifest["methods"] if manifest else {}).items():
            if name not in consolidated:
                sources[name] = _StagedMaps(staging, name, n, int(manifest["chunk_rows"]), shape)
                methods[name] = {"method": spec["method"], "params": spec["params"], "consolidated": False}
        for name, spec in methods.items():
            spec["rows_done"] = sources[name].rows_done
        header["complete"] = all(spec["consolidated"] for spec in methods.values())
        if require_complete and not header["complete"]:
            raise RoarError(_unfinished(path, n, methods))
        rows = cls._rows(path, h5, staging, manifest, n)
        return cls(path, header, methods, sources, h5, staging, rows)

    @staticmethod
    def _rows(path: Path, h5, staging: _Staging, manifest: dict | None, n: int) -> dict[str, np.ndarray]:
        if h5 is not None:
            try:
                return {key: h5[key][:] for key in ("labels", "predictions", "indices")}
            except Exception as exc:
                raise _damaged(path, exc) from None
        rows = {key: np.full(n, -1, dtype=np.int64) for key in ("labels", "predictions", "indices")}
        step = int(manifest["chunk_rows"])
        for start in staging.chunks(None):
            data = _load_rows(staging, start, min(start + step, n) - start) if start < n else None
            for key, value in (data or {}).items():
                if key in rows:
                    rows[key][start : start + len(value)] = value
        return rows

    # ---------------------------------------------------------------------------------- access

    def _source(self, method: str):
        if method not in self._sources:
            raise RoarError(
                f"no method '{method}' in {self.path}{closest(method, self.methods)}; "
                f"it holds: {', '.join(self.methods) or 'none'}"
            )
        return self._sources[method]

    def read(self, method: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 maps of rows [start, stop) ([k, H, W] or [k, C, H, W]); unwritten rows are NaN."""
        source = self._source(method)
        stop = self.n if stop is None else stop
        if not 0 <= start <= stop <= self.n:
            raise ValueError(f"rows [{start}, {stop}) are outside [0, {self.n}) in {self.path}")
        return source.read(start, stop)

    def read_rows(self, method: str, rows) -> np.ndarray:
        """float32 maps of the given ascending ``rows`` (a sample of the split), read as runs of
        consecutive rows so that a sparse sample never loads the rows between its members."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (np.diff(rows) <= 0).any():
            raise ValueError("rows must be a 1-D ascending sequence without repeats")
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        runs = np.split(rows, breaks) if len(rows) else []
        parts = [self.read(method, int(run[0]), int(run[-1]) + 1) for run in runs]
        return np.concatenate(parts) if parts else np.empty((0, *self.read(method, 0, 0).shape[1:]), np.float32)

    def read_chunks(self, method: str) -> Iterator[tuple[int, np.ndarray]]:
        """(start, maps) for each stored chunk, in order: the cheapest way to stream a whole method."""
        return self._source(method).chunks()

    @property
    def labels(self) -> np.ndarray:
        return self._rows["labels"]

    @property
    def predictions(self) -> np.ndarray:
        return self._rows["predictions"]

    @property
    def indices(self) -> np.ndarray:
        return self._rows["indices"]

    @property
    def complete(self) -> bool:
        return bool(self.attrs["complete"])

    def method_info(self, method: str) -> dict:
        """{"method", "params", "rows_done", "n", "complete"} of one stored method."""
        self._source(method)
        spec = self._methods[method]
        return {
            "method": spec["method"],
            "params": spec["params"],
            "rows_done": spec["rows_done"],
            "n": self.n,
            "complete": spec["consolidated"],
        }

    def validate_for(self, *, dataset: str, split: str, n: int, geometry, dataset_fingerprint: str) -> None:
        """RoarError naming the first way in which this store does not belong to the given dataset split."""
        checks = [
            (self.split == split, f"store is for split '{self.split}', asked for '{split}'"),
            (
                self.attrs["dataset"] == dataset,
                f"store is for dataset '{self.attrs['dataset']}', asked for '{dataset}'",
            ),
            (self.n == int(n), f"store holds {self.n} images, the dataset split has {int(n)}"),
            (
                list(self.geometry) == [int(x) for x in geometry],
                f"store geometry is {_geometry_text(self.geometry)}, the dataset's is {_geometry_text(geometry)}",
            ),
            (
                self.attrs["dataset_fingerprint"] == dataset_fingerprint,
                f"store was made for dataset fingerprint {_short(self.attrs['dataset_fingerprint'])}, "
                f"this dataset is {_short(dataset_fingerprint)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RoarError(f"{self.path}: {message}; rerun {RERUN} for this dataset or point to another store")

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> AttributionStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unfinished(path: Path, n: int, methods: dict[str, dict]) -> str:
    parts = []
    for name, spec in methods.items():
        if not spec["consolidated"]:
            note = "" if spec["rows_done"] < n else ", not yet consolidated"
            parts.append(f"{name}: {spec['rows_done']} of {n} images{note}")
    return f"{path} is unfinished ({'; '.join(parts)}); rerun {RERUN} to complete it"


def describe(path: str | Path) -> str:
    """A human-readable summary of a store, finished or not (``roar inspect FILE.h5``)."""
    path = Path(path)
    with AttributionStore.open(path, require_complete=False) as store:
        a = store.attrs
        provenance = a.get("provenance") or {}
        kept = "channels kept" if store.channels else f"reduced over channels ({a['reduction']})"
        lines = [
            f"{path}: {'complete' if store.complete else 'UNFINISHED'}",
            f"  split       {store.split}, {store.n} images, geometry {_geometry_text(store.geometry)}, {kept}",
            f"  dataset     {a['dataset']} (fingerprint {a['dataset_fingerprint']})",
            f"  model       {a['model_hash']}",
            f"  reduction   {a['reduction']}, target {a['target']}",
            f"  methods     {len(store.methods)}",
        ]
        for name in store.methods:
            info = store.method_info(name)
            state = "complete" if info["complete"] else "UNFINISHED"
            state += (
                " (all computed, not yet consolidated)" if info["rows_done"] == store.n and not info["complete"] else ""
            )
            params = _dumps(info["params"])
            lines.append(f"    {name}: {info['method']} {params}, {info['rows_done']} / {store.n} images, {state}")
        staged = _size(staging_path(path))
        size = _mib(_size(path)) + (f" (+ {_mib(staged)} staged in {staging_path(path).name})" if staged else "")
        lines.append(f"  size        {size}")
        lines.append(
            f"  provenance  roar {provenance.get('roar_version', a.get('roar_version'))}, "
            f"git {provenance.get('git_commit') or 'unknown'}"
        )
        return "\n".join(lines)
