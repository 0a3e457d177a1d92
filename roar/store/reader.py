"""``MapStore``: reads the arrays of one split, finished or (on request) still being written.

A store is read from its HDF5 file, its staging folder, or both (a finished store gaining an
array set). By default only a complete store opens: a partly written one is refused with a line
listing what is missing, so no stage ever evaluates a half-written set by accident; with
``require_complete=False`` rows not yet computed read as NaN and labels as -1.

Files of every format version read the same way: the header and each set's identity are
presented in today's layout (``roar.store.format``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from roar.core.errors import RoarError
from roar.core.registry import closest
from roar.store.format import (
    ROWS,
    dequantize,
    extras_of,
    geometry_text,
    map_shape,
    rerun_hint,
    short,
    staging_path,
    store_identity,
)
from roar.store.hdf5 import chunk_rows_of, damaged, open_h5, read_header, read_sets, set_digest
from roar.store.staging import Staging


class _H5Maps:
    """A consolidated array set: every row present in the HDF5 file."""

    def __init__(self, path: Path, f: h5py.File, name: str, rerun: str | None):
        self.path, self.maps, self.scales, self.rerun = path, f["maps"][name], f["scales"][name], rerun
        self.rows_done = len(self.maps)

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            return dequantize(self.maps[start:stop], self.scales[start:stop])
        except Exception as exc:
            raise damaged(self.path, exc, self.rerun) from None

    def digest(self) -> str:
        try:
            return set_digest(self.maps, self.scales)
        except Exception as exc:
            raise damaged(self.path, exc, self.rerun) from None

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        step = chunk_rows_of(self.maps)
        for start in range(0, len(self.maps), step):
            yield start, self.read(start, min(start + step, len(self.maps)))


class _StagedMaps:
    """An array set still in the staging folder: rows not yet computed read as NaN."""

    def __init__(self, staging: Staging, name: str, n: int, chunk_rows: int, shape: tuple[int, ...]):
        self.staging, self.name, self.n, self.chunk_rows, self.shape = staging, name, n, chunk_rows, shape
        self.done = sorted(start for start in staging.chunks(name) if start < n and start % chunk_rows == 0)
        self.rows_done = sum(self._end(start) - start for start in self.done)

    def _end(self, start: int) -> int:
        return min(start + self.chunk_rows, self.n)

    def _chunk(self, start: int) -> np.ndarray | None:
        data = self.staging.load_map(self.name, start, self._end(start) - start, self.shape)
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


class MapStore:
    """Reads the arrays of one split. Open with ``MapStore.open(path)``.

    ``methods`` lists the array sets in stored order; ``identity`` is the store-wide identity the
    writer was given, ``method_info(name)`` one set's identity with its progress; ``rerun`` is the
    command that recreates the file (None for files that do not record one).
    """

    def __init__(self, path: Path, header: dict, methods: dict[str, dict], sources: dict, h5, staging, rows):
        self.path = path
        self.attrs = header
        self._methods, self._sources, self._h5, self._staging, self._rows = methods, sources, h5, staging, rows
        self.n = int(header["n"])
        self.geometry = tuple(int(x) for x in header["geometry"])
        self.split = header["split"]
        self.channels = bool(header["channels"])
        self.identity = header["identity"]
        self.rerun = header.get("rerun")
        self.methods = list(methods)

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True, rerun: str | None = None) -> MapStore:
        """The store at ``path``; unless ``require_complete=False``, only if every array set has every row.

        ``rerun`` is the command that recreates the store, for the error messages; without it they
        print the command recorded in the file, or a generic wording.
        """
        path = Path(path)
        staging = Staging(staging_path(path), rerun)
        h5 = open_h5(path, rerun) if path.exists() else None
        try:
            return cls._build(path, h5, staging, require_complete, rerun)
        except BaseException:
            if h5 is not None:
                h5.close()
            raise

    @classmethod
    def _build(cls, path: Path, h5, staging: Staging, require_complete: bool, rerun: str | None) -> MapStore:
        stored = read_header(path, h5, rerun) if h5 is not None else None
        staging.rerun = rerun = rerun or (stored or {}).get("rerun")
        consolidated = read_sets(path, h5, rerun) if h5 is not None else {}
        manifest = staging.live_manifest(consolidated)
        if h5 is None and manifest is None:
            raise RoarError(f"no store at {path}; run {rerun or 'the stage that writes it'} first")
        header = {key: value for key, value in (stored or manifest).items() if key not in ("chunk_rows", "methods")}
        header["identity"] = store_identity(header)
        rerun = header["rerun"] = rerun or (manifest or {}).get("rerun")
        n, shape = int(header["n"]), map_shape(header["geometry"], header["channels"])
        sources: dict[str, Any] = {name: _H5Maps(path, h5, name, rerun) for name in consolidated}
        methods = {name: {"identity": info["identity"], "consolidated": True} for name, info in consolidated.items()}
        for name, identity in (manifest["methods"] if manifest else {}).items():
            if name not in consolidated:
                sources[name] = _StagedMaps(staging, name, n, int(manifest["chunk_rows"]), shape)
                methods[name] = {"identity": identity, "consolidated": False}
        for name, spec in methods.items():
            spec["rows_done"] = sources[name].rows_done
        header["complete"] = all(spec["consolidated"] for spec in methods.values())
        if require_complete and not header["complete"]:
            raise RoarError(_unfinished(path, n, methods, rerun))
        rows = cls._rows(path, h5, staging, manifest, n, rerun, extras_of(header))
        return cls(path, header, methods, sources, h5, staging, rows)

    @staticmethod
    def _rows(path: Path, h5, staging: Staging, manifest: dict | None, n: int, rerun, extras) -> dict[str, np.ndarray]:
        """Labels, predictions, indices and the declared extra row arrays; rows not yet written are
        -1 (0 / NaN in extras)."""
        if h5 is not None:
            try:
                return {key: h5[key][:] for key in ROWS} | {name: h5["extras"][name][:] for name in extras}
            except Exception as exc:
                raise damaged(path, exc, rerun) from None
        rows = {key: np.full(n, -1, dtype=np.int64) for key in ROWS}
        for name, spec in extras.items():
            rows[name] = np.full((n, *spec["shape"]), np.nan if spec["dtype"] == "float32" else 0, dtype=spec["dtype"])
        step = int(manifest["chunk_rows"])
        for start in staging.chunks(None):
            data = staging.load_rows(start, min(start + step, n) - start, extras) if start < n else None
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
        """(start, maps) for each stored chunk, in order: the cheapest way to stream a whole array set."""
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
    def extras(self) -> list[str]:
        """Names of the extra row arrays the store keeps (``StoreWriter(extras=...)``)."""
        return list(extras_of(self.attrs))

    def extra(self, name: str) -> np.ndarray:
        """One extra row array, [N, ...] in row order."""
        if name not in self.extras:
            raise RoarError(f"no extra row array '{name}' in {self.path}; it holds: {', '.join(self.extras) or 'none'}")
        return self._rows[name]

    @property
    def complete(self) -> bool:
        return bool(self.attrs["complete"])

    def identity_of(self, method: str) -> dict:
        """The identity the writer was given for array set ``method``."""
        self._source(method)
        return dict(self._methods[method]["identity"])

    def digest(self, method: str) -> str:
        """The content digest of a finished array set (``roar.store.hdf5.Digest``): it changes whenever the
        stored values do, so a result records it as the identity of the maps it was computed from."""
        source = self._source(method)
        if not isinstance(source, _H5Maps):
            raise RoarError(_unfinished(self.path, self.n, {method: self._methods[method]}, self.rerun))
        return source.digest()

    def method_info(self, method: str) -> dict:
        """One array set's identity (``{"method", "params"}`` for attribution maps) with ``rows_done``,
        ``n`` and ``complete``."""
        self._source(method)
        spec = self._methods[method]
        return {**spec["identity"], "rows_done": spec["rows_done"], "n": self.n, "complete": spec["consolidated"]}

    def validate_for(
        self, *, dataset: str, split: str, n: int, geometry, dataset_fingerprint: str, model_hash: str | None = None
    ) -> None:
        """RoarError naming the first way in which this store does not belong to the given dataset split
        (and, with ``model_hash``, to the model whose arrays it should hold)."""
        checks = [
            (self.split == split, f"store is for split '{self.split}', asked for '{split}'"),
            (
                self.attrs["dataset"] == dataset,
                f"store is for dataset '{self.attrs['dataset']}', asked for '{dataset}'",
            ),
            (self.n == int(n), f"store holds {self.n} images, the dataset split has {int(n)}"),
            (
                list(self.geometry) == [int(x) for x in geometry],
                f"store geometry is {geometry_text(self.geometry)}, the dataset's is {geometry_text(geometry)}",
            ),
            (
                self.attrs["dataset_fingerprint"] == dataset_fingerprint,
                f"store was made for dataset fingerprint {short(self.attrs['dataset_fingerprint'])}, "
                f"this dataset is {short(dataset_fingerprint)}",
            ),
            (
                model_hash is None or self.attrs["model_hash"] == model_hash,
                f"store was made with model {short(self.attrs['model_hash'])}, this run's model is {short(model_hash)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RoarError(
                    f"{self.path}: {message}; rerun {rerun_hint(self.rerun)} for this dataset or point to another store"
                )

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> MapStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unfinished(path: Path, n: int, methods: dict[str, dict], rerun: str | None) -> str:
    parts = []
    for name, spec in methods.items():
        if not spec["consolidated"]:
            note = "" if spec["rows_done"] < n else ", not yet consolidated"
            parts.append(f"{name}: {spec['rows_done']} of {n} images{note}")
    return f"{path} is unfinished ({'; '.join(parts)}); rerun {rerun_hint(rerun)} to complete it"
