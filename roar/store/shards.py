"""Stores written in shards, one process (rank, job) each, and stitched into one store without copying.

A split of N rows is cut into ``count`` contiguous row ranges along the grid of ``step`` rows that a
single writer would process (``shard_ranges``): every shard computes exactly the batches a single
process would, so per-batch random streams, and hence the maps, are the same bit for bit. Shard
``i`` writes an ordinary store, ``<split>.shard-<i>-of-<count>.h5``, over its own rows, on the whole
store's chunk grid; its identity carries the range (``"shard": {"rows": [lo, hi], "of": N, ...}``)
so that a resumed shard is the same shard. No row is padded or duplicated.

``merge`` stitches the finished shards into ``<split>.h5``: each array set becomes an HDF5 virtual
dataset whose rows point into the shard files (referenced by name, relative to the merged file's
folder, so a run folder can be moved whole), the small per-row arrays (labels, predictions,
indices) are copied, and each set's content digest is computed by reading it once in row order,
the digest a single writer would have recorded. Before writing it checks that every shard is
present and complete, that they share one header and one identity per array set, and that their
ranges tile [0, N) with no row missing or doubled; any failure names the shard and the way out.
The merged file reads like any other store (``MapStore``, the retraining loader).
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

from roar.core.atomic import atomic_path
from roar.core.errors import RoarError
from roar.store.format import ROWS, chunk_rows_for, extras_of, rerun_hint
from roar.store.hdf5 import Digest, chunk_rows_of, open_h5, read_header, read_sets, write_header, write_set_attrs

SHARD = "shard"


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` → (i, n), 0 ≤ i < n; None → (0, 1)."""
    if text is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise RoarError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(match[1]), int(match[2])


def shard_ranges(n: int, step: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous [lo, hi) ranges covering [0, n), cut at multiples of ``step`` (whole batches),
    as even in batches as possible. More shards than batches would leave one empty: refused."""
    batches = -(-n // step)
    if count > batches:
        es, s = ("es", "s") if batches > 1 else ("", "")
        raise RoarError(f"{count} shards for {batches} batch{es} of {step} rows: use at most {batches} shard{s}")
    cuts = [min(n, (batches * i // count) * step) for i in range(count + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def shard_rows(n: int, row_bytes: int, batch_size: int, shard: tuple[int, int], split: str) -> tuple[int, int, int]:
    """(lo, hi, chunk rows) of shard ``(i, count)`` of a split of ``n`` rows of ``row_bytes`` each: whole
    batches of the grid one process takes (``batch_size`` rounded to whole chunks), on the chunk grid
    of the whole store, so that the shards' chunks line up in the merged one."""
    rows = chunk_rows_for(row_bytes, n)
    step = max(rows, (batch_size // rows) * rows)
    try:
        lo, hi = shard_ranges(n, step, shard[1])[shard[0]]
    except RoarError as exc:
        raise RoarError(f"--shard {shard[0]}/{shard[1]}: split '{split}': {exc}") from None
    return lo, hi, rows


def shard_path(path: str | Path, index: int, count: int) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.shard-{index}-of-{count}{path.suffix}")


def shard_paths(path: str | Path, count: int) -> list[Path]:
    return [shard_path(path, i, count) for i in range(count)]


def shard_identity(index: int, count: int, lo: int, hi: int, n: int) -> dict:
    return {"index": index, "count": count, "rows": [lo, hi], "of": n}


def merge(path: str | Path, count: int, rerun: str | None = None) -> Path:
    """Stitch ``<split>.shard-*-of-<count>.h5`` into ``path`` (see the module docstring); returns ``path``."""
    path = Path(path)
    shards = shard_paths(path, count)
    headers, sets = [], []
    for i, shard in enumerate(shards):
        if not shard.exists():
            raise RoarError(
                f"{path}: shard {i} of {count} ({shard.name}) is missing; run {rerun_hint(rerun)} --shard {i}/{count}"
            )
        with open_h5(shard, rerun) as f:
            headers.append(read_header(shard, f, rerun))
            sets.append(read_sets(shard, f, rerun))
            if sets[-1]:
                headers[-1]["chunk_rows"] = chunk_rows_of(f["maps"][next(iter(sets[-1]))])
    header = _common_header(path, shards, headers, sets)
    n, ranges = header["n"], [tuple(h["identity"][SHARD]["rows"]) for h in headers]
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
        write_header(out, header)
        sources = [h5py.File(s, "r") for s in shards]
        try:
            for key in ROWS:
                out.create_dataset(key, data=np.concatenate([f[key][:] for f in sources]), dtype=np.int64)
            if extras_of(header):
                group = out.create_group("extras", track_order=True)
                for name in extras_of(header):
                    group.create_dataset(name, data=np.concatenate([f["extras"][name][:] for f in sources]))
            maps, scales = out.create_group("maps", track_order=True), out.create_group("scales", track_order=True)
            chunk_rows = int(headers[0].get("chunk_rows", 1))
            for name, info in sets[0].items():
                for group, key in ((maps, "maps"), (scales, "scales")):
                    first = sources[0][key][name]
                    layout = h5py.VirtualLayout(shape=(n, *first.shape[1:]), dtype=first.dtype)
                    for shard, f, (lo, hi) in zip(shards, sources, ranges):
                        if hi > lo:
                            layout[lo:hi] = h5py.VirtualSource(shard.name, f"{key}/{name}", shape=f[key][name].shape)
                    group.create_virtual_dataset(name, layout)
                maps[name].attrs["chunk_rows"] = chunk_rows
                maps[name].attrs["digest"] = _digest(sources, name, chunk_rows)
                write_set_attrs(maps[name], info["identity"], n)
        finally:
            for f in sources:
                f.close()
        out.attrs["complete"] = True
    return path


def merge_when_last(path: str | Path, count: int, rerun: str | None = None, again: bool = False) -> Path | None:
    """``merge`` under the lock of ``path``, waiting for a merge in progress: the last two shards may
    finish together and both find every shard done. The one that comes second finds the merged
    store and returns None, unless ``again`` (``roar merge`` by hand) asks to merge anew."""
    from roar.core.locks import FileLock

    path = Path(path)
    with FileLock(path, blocking=True):
        if path.exists() and not again:
            return None
        return merge(path, count, rerun)


def _common_header(path: Path, shards: list[Path], headers: list[dict], sets: list[dict]) -> dict:
    """The merged file's header; RoarError naming the first shard that does not fit with shard 0."""
    count = len(shards)
    ranges = []
    for i, (shard, header) in enumerate(zip(shards, headers)):
        info = (header.get("identity") or {}).get(SHARD)
        if not info or info.get("index") != i or info.get("count") != count:
            raise RoarError(f"{shard}: not shard {i} of {count} of {path.name}; delete it and rerun that shard")
        ranges.append(tuple(info["rows"]))
        for key in ("split", "geometry", "dataset", "dataset_fingerprint", "model_hash", "channels", "chunk_rows"):
            if header.get(key) != headers[0].get(key):
                raise RoarError(f"{shard}: {key} differs from {shards[0].name}'s; rerun the shards of one run")
        rest = {k: v for k, v in header["identity"].items() if k != SHARD}
        if rest != {k: v for k, v in headers[0]["identity"].items() if k != SHARD}:
            raise RoarError(f"{shard}: made with other settings than {shards[0].name}; rerun the shards of one run")
        if {k: v["identity"] for k, v in sets[i].items()} != {k: v["identity"] for k, v in sets[0].items()}:
            raise RoarError(f"{shard}: holds other array sets than {shards[0].name}; rerun the shards of one run")
    total = headers[0]["identity"][SHARD]["of"]
    expected = 0
    for shard, (lo, hi) in zip(shards, ranges):
        if lo != expected:
            what = "missing" if lo > expected else "doubled"
            raise RoarError(f"{shard}: rows {min(lo, expected)}-{max(lo, expected)} are {what} between the shards")
        expected = hi
    if expected != total:
        raise RoarError(f"{shards[-1]}: rows {expected}-{total} are missing; rerun the shards of one run")
    header = {k: v for k, v in headers[0].items() if k not in ("complete", "chunk_rows")}
    header["n"] = total
    header["identity"] = {k: v for k, v in headers[0]["identity"].items() if k != SHARD}
    return header


def _digest(sources: list[h5py.File], name: str, chunk_rows: int) -> str:
    """The set's content digest over the shards in row order, chunk by chunk as a single writer hashes it."""
    digest = Digest()
    for f in sources:
        maps, scales = f["maps"][name], f["scales"][name]
        for start in range(0, len(maps), chunk_rows):
            digest.update(maps[start : start + chunk_rows], scales[start : start + chunk_rows])
    return digest.hexdigest()
