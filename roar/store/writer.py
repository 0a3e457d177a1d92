"""``StoreWriter``: writes, resumes or extends the store of one dataset split, surviving SIGKILL.

At every instant the HDF5 file is either absent or a cleanly closed, complete file. Finished
chunks go to the staging folder (``roar.store.staging``); ``finish()`` consolidates everything
into a new HDF5 file under a temporary name and renames it over ``<split>.h5``
(``roar.core.atomic``), then deletes the staging folder. Readers refuse a store whose staging
folder still holds array sets that are not in the HDF5 file. The price: consolidation writes the
arrays once more, and adding an array set to a finished store rewrites the file (existing sets'
compressed chunks are copied as they are, so their bytes never change).

A hidden ``.<split>.h5.lock`` (``roar.core.locks``) keeps two writers off the same store; the
kernel drops it when the writer dies, so a killed writer never blocks the next one.

The writer knows nothing about what it stores: the caller names each array set and gives its
identity, the store-wide identity and the command that recreates the file (see ``StoreWriter``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import roar
from roar.core.atomic import atomic_path
from roar.core.errors import RoarError
from roar.core.locks import FileLock
from roar.store.format import (
    COMPRESSIONS,
    FORMAT,
    FORMAT_VERSION,
    ROWS,
    chunk_rows_for,
    current_header,
    extras_of,
    extras_spec,
    geometry_text,
    map_shape,
    normalise,
    numpy,
    quantize,
    rerun_hint,
    staging_path,
)
from roar.store.hdf5 import (
    Digest,
    chunk_rows_of,
    damaged,
    open_h5,
    read_header,
    read_sets,
    write_header,
    write_set_attrs,
)
from roar.store.identity import check_identity, check_names, check_set, check_store
from roar.store.staging import Staging, remove_temporaries

log = logging.getLogger(__name__)


class StoreWriter:
    """Writes (or resumes, or extends) the store of one split.

    ``methods`` maps the name of each array set to its identity, a plain JSON-able dict that must
    match whenever the set is resumed (``{"method": ..., "params": {...}}`` for an attribution
    method, ``{"epoch": ..., "step": ...}`` for a VoG snapshot). ``identity`` is the store-wide
    part (the attribution stage's reduction and target). ``rerun`` is the command
    that recreates the file (``"roar extract"``), printed by every error about it and kept in
    the header for later readers.

    Work proceeds in chunks of ``chunk_rows()`` rows: ``pending(name)`` lists the row ranges still
    to compute, ``write`` stores finished rows, ``finish`` consolidates.

    ``extras`` declares small per-row arrays kept beside labels, predictions and indices, e.g.
    ``{"top": ("int64", (5,))}`` for five class ids per image: what a stage needs to read its maps
    (the classes of the insecurity maps' pairs) is then written with them, chunk by chunk, and
    resumed with them. The declaration is part of the store's identity; every ``write`` gives them.
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
        channels: bool,
        methods: dict[str, dict],
        provenance: dict,
        identity: dict | None = None,
        rerun: str | None = None,
        compression: str | None = "lzf",
        extras: dict[str, tuple[str, tuple[int, ...]]] | None = None,
        chunk_rows: int | None = None,
    ):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        identity = dict(identity or {})
        check_identity(identity)
        if extras:
            identity["extras"] = extras_spec(extras)
        if int(n) < 1:
            raise RoarError(f"split '{split}' has no images; nothing to store in {path}")
        if len(tuple(geometry)) != 3:
            raise ValueError(f"geometry must be (C, H, W), got {geometry!r}")
        check_names(methods)
        self.path = Path(path)
        self.compression = compression
        self.rerun = rerun
        self._requested_chunk_rows = chunk_rows  # a shard takes the whole store's chunk grid
        self._closed = False
        self._lock = FileLock(self.path).acquire()
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
                    "identity": normalise(identity),
                    "channels": bool(channels),
                    "rerun": rerun,
                    "provenance": normalise(provenance),
                },
                {name: normalise(spec) for name, spec in methods.items()},
            )
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------------- setup

    def _setup(self, header: dict, requested: dict[str, dict]) -> None:
        self.staging = Staging(staging_path(self.path), self.rerun)
        remove_temporaries(self.path.parent, prefix=f".{self.path.name}.")
        self.staging.remove_temporaries()
        stored, self.consolidated, self.h5_rows, chunk_rows = self._read_existing(header)
        manifest = self.staging.live_manifest(self.consolidated)
        if manifest is None and self.staging.root.exists():
            self.staging.remove()
        if manifest is not None:
            check_store(self.staging.root, manifest, header)
            chunk_rows = chunk_rows or int(manifest["chunk_rows"])
            stored = stored if stored is not None else manifest
        for name, spec in requested.items():
            if name in self.consolidated:
                check_set(self.path, name, self.consolidated[name], spec)
            elif manifest is not None and name in manifest["methods"]:
                check_set(self.staging.root, name, manifest["methods"][name], spec)
        # A resumed store keeps the provenance of the run that began it, in today's layout.
        base = current_header(stored) if stored is not None else header
        base["rerun"] = self.rerun = self.staging.rerun = self.rerun or base.get("rerun")
        self.header = {key: value for key, value in base.items() if key not in ("complete", "chunk_rows", "methods")}
        self.extras = extras_of(self.header)
        self.n = int(self.header["n"])
        self.shape = map_shape(self.header["geometry"], self.header["channels"])
        self._chunk_rows = (
            chunk_rows or self._requested_chunk_rows or chunk_rows_for(2 * int(np.prod(self.shape)), self.n)
        )
        self._setup_staging(manifest, requested)

    def _read_existing(self, header: dict) -> tuple[dict | None, dict, dict | None, int | None]:
        """Header, array set identities, rows and chunk size of an existing consolidated file, checked
        against this run."""
        if not self.path.exists():
            return None, {}, None, None
        with open_h5(self.path, self.rerun) as f:
            stored = read_header(self.path, f, self.rerun)
            check_store(self.path, stored, header)
            sets = read_sets(self.path, f, self.rerun)
            try:
                rows = {key: f[key][:] for key in ROWS}
                rows.update({name: f["extras"][name][:] for name in extras_of(stored)})
                chunk_rows = chunk_rows_of(f["maps"][next(iter(sets))]) if sets else None
            except Exception as exc:
                raise damaged(self.path, exc, self.rerun) from None
        return stored, {name: info["identity"] for name, info in sets.items()}, rows, chunk_rows

    def _setup_staging(self, manifest: dict | None, requested: dict[str, dict]) -> None:
        """Keep staged sets that are requested or already complete; drop partial leftovers of others."""
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
        self.methods = {**self.consolidated, **staged}
        self._done = {name: set(starts) for name in self.consolidated}
        self._rows_done: set[int] = set()
        if not staged:
            return
        for folder in self.staging.set_folders():
            if folder not in kept:  # partial maps of a dropped set, or debris under a new set's name
                self.staging.remove_set(folder)
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
        """[start, stop) row ranges of array set ``method`` not yet written, in order, chunk-aligned."""
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

    def write(self, start: int, maps: dict[str, Any], labels, predictions, indices, extras=None) -> None:
        """Store rows [start, start + k) of the given array sets (and of the declared ``extras`` row
        arrays); all are validated before anything lands."""
        self._check_open()
        given = {"labels": labels, "predictions": predictions, "indices": indices}
        rows = {key: numpy(value).astype(np.int64).reshape(-1) for key, value in given.items()}
        k = len(rows["indices"])
        self._check_range(start, k, rows)
        rows.update(self._checked_extras(extras or {}, k))
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

    def _checked_extras(self, extras: dict[str, Any], k: int) -> dict[str, np.ndarray]:
        if set(extras) != set(self.extras):
            raise ValueError(
                f"{self.path}: write must give the extra row arrays {sorted(self.extras)}, got {sorted(extras)}"
            )
        out = {}
        for name, spec in self.extras.items():
            a = numpy(extras[name])
            if a.shape != (k, *spec["shape"]):
                raise ValueError(f"extra row array '{name}' has shape {list(a.shape)}, expected {[k, *spec['shape']]}")
            if spec["dtype"] == "float32" and not np.isfinite(a).all():
                raise RoarError(f"extra row array '{name}' holds NaN or Inf")
            out[name] = a.astype(spec["dtype"])
        return out

    def _checked_maps(self, name: str, value: Any, k: int, indices: np.ndarray) -> np.ndarray:
        if name not in self.methods:
            raise ValueError(f"unknown method '{name}' for {self.path}; known: {', '.join(self.methods)}")
        if name in self.consolidated:
            raise ValueError(f"method '{name}' is already complete in {self.path}")
        a = numpy(value).astype(np.float32, copy=False)
        if not self.header["channels"] and a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        if a.shape != (k, *self.shape):
            layout = "[k, C, H, W]" if self.header["channels"] else "[k, H, W] or [k, 1, H, W]"
            raise RoarError(
                f"method '{name}' produced maps of shape {list(a.shape)}, expected {[k, *self.shape]} ({layout} for "
                f"geometry {geometry_text(self.header['geometry'])})"
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
            known = self.staging.load_rows(chunk, b - a, self.extras)
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
        """Consolidate into the HDF5 file if every array set has every row; close either way."""
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
        """Build the complete HDF5 file under a temporary name; it replaces the store only once whole and fsynced."""
        with atomic_path(self.path) as tmp, h5py.File(tmp, "w") as out:
            old = open_h5(self.path, self.rerun) if self.consolidated else None
            try:
                self._fill(out, old)
            finally:
                if old is not None:
                    old.close()

    def _fill(self, out: h5py.File, old: h5py.File | None) -> None:
        write_header(out, self.header)
        rows = self.h5_rows if self.h5_rows is not None else self._staged_rows()
        for key in ROWS:
            out.create_dataset(key, data=rows[key], dtype=np.int64, compression=self.compression)
        if self.extras:
            group = out.create_group("extras", track_order=True)
            for name, spec in self.extras.items():
                group.create_dataset(name, data=rows[name], dtype=spec["dtype"], compression=self.compression)
        maps, scales = out.create_group("maps", track_order=True), out.create_group("scales", track_order=True)
        for name in self.methods:
            if name in self.consolidated:
                out.copy(old["maps"][name], maps, name=name)
                out.copy(old["scales"][name], scales, name=name)
                write_set_attrs(maps[name], self.methods[name], self.n)
            else:
                self._fill_set(maps, scales, name)
        out.attrs["complete"] = True

    def _staged_rows(self) -> dict[str, np.ndarray]:
        parts = []
        for chunk in range(0, self.n, self._chunk_rows):
            data = self.staging.load_rows(chunk, self._chunk_end(chunk) - chunk, self.extras)
            if data is None:
                self.staging.discard(None, chunk)
                raise self._damaged_chunk(f"rows/{chunk:012d}.npz")
            parts.append(data)
        return {key: np.concatenate([p[key] for p in parts]) for key in (*ROWS, *self.extras)}

    def _fill_set(self, maps: h5py.Group, scales: h5py.Group, name: str) -> None:
        compression = {"compression": self.compression, "shuffle": self.compression is not None}
        ds = maps.create_dataset(
            name, shape=(self.n, *self.shape), dtype=np.float16, chunks=(self._chunk_rows, *self.shape), **compression
        )
        sc = scales.create_dataset(name, shape=(self.n,), dtype=np.float32, compression=self.compression)
        digest = Digest()
        for chunk in range(0, self.n, self._chunk_rows):
            end = self._chunk_end(chunk)
            data = self.staging.load_map(name, chunk, end - chunk, self.shape)
            if data is None:
                self.staging.discard(name, chunk)
                raise self._damaged_chunk(f"maps/{name}/{chunk:012d}.npz")
            ds[chunk:end] = data["q"]
            sc[chunk:end] = data["scale"]
            digest.update(data["q"], data["scale"])
        ds.attrs["digest"] = digest.hexdigest()
        write_set_attrs(ds, self.methods[name], self.n)

    def _damaged_chunk(self, relative: str) -> RoarError:
        return RoarError(
            f"{self.staging.root / relative} was unreadable and has been removed; rerun {rerun_hint(self.rerun)} "
            "to recompute it"
        )

    def close(self) -> None:
        """Release the store without consolidating (finished chunks stay staged for a later run)."""
        if self._closed:
            return
        self._closed = True
        self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
