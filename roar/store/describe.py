"""``describe(path)``: what ``roar inspect FILE.h5`` prints about a store, finished or not.

The summary is built from what the file records, not from what the caller knows, so it reads the
same for attribution maps and VoG gradients and for files of every format version: the fields
every store has, then each key of the store-wide identity on its own line, then one line per array
set (an identity's ``method`` first as a bare word and its ``params`` as JSON, so attribution
methods read as ``ig: integrated_gradients {"steps": 50}``; other keys as ``key=value``).
"""

from __future__ import annotations

from pathlib import Path

from roar.store.format import dumps, geometry_text, staging_path, value_text
from roar.store.reader import MapStore


def identity_text(identity: dict) -> str:
    parts, rest = [], dict(identity)
    if isinstance(rest.get("method"), str):
        parts.append(rest.pop("method"))
    if "params" in rest:
        parts.append(dumps(rest.pop("params")))
    parts += [f"{key}={value_text(value)}" for key, value in rest.items()]
    return " ".join(parts) or "{}"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def describe(path: str | Path) -> str:
    """A human-readable summary of a store, finished or not (``roar inspect FILE.h5``)."""
    path = Path(path)
    with MapStore.open(path, require_complete=False) as store:
        a = store.attrs
        provenance = a.get("provenance") or {}
        kept = "channels kept" if store.channels else "channels reduced"
        lines = [
            f"{path}: {'complete' if store.complete else 'UNFINISHED'}",
            f"  split       {store.split}, {store.n} images, geometry {geometry_text(store.geometry)}, {kept}",
            f"  dataset     {a['dataset']} (fingerprint {a['dataset_fingerprint']})",
            f"  model       {a['model_hash']}",
        ]
        lines += [f"  {key:<11} {value_text(value)}" for key, value in store.identity.items()]
        lines.append(f"  methods     {len(store.methods)}")
        for name in store.methods:
            info = store.method_info(name)
            state = "complete" if info["complete"] else "UNFINISHED"
            state += (
                " (all computed, not yet consolidated)" if info["rows_done"] == store.n and not info["complete"] else ""
            )
            text = identity_text(store.identity_of(name))
            lines.append(f"    {name}: {text}, {info['rows_done']} / {store.n} images, {state}")
        staged = _size(staging_path(path))
        size = _mib(_size(path)) + (f" (+ {_mib(staged)} staged in {staging_path(path).name})" if staged else "")
        lines.append(f"  size        {size}")
        if store.rerun:
            lines.append(f"  rerun       {store.rerun}")
        lines.append(
            f"  provenance  roar {provenance.get('roar_version', a.get('roar_version'))}, "
            f"git {provenance.get('git_commit') or 'unknown'}"
        )
        return "\n".join(lines)
