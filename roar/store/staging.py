"""The staging folder ``<split>.h5.staging/``: finished chunks waiting to be consolidated.

HDF5 is not crash-safe: a process killed while the library writes metadata can leave a file
that no longer opens, and a crashed SWMR writer leaves a flag that h5py cannot clear. So while
arrays are computed, nothing touches the HDF5 file; every finished (array set, chunk) becomes its
own small file here instead, written under a temporary name, fsynced and renamed
(``roar.core.atomic``). A chunk file either exists whole or not at all, and its existence is the
progress marker: a resumed run recomputes exactly the chunks without a file.

``store.json`` (the manifest) holds the header the chunks were computed for, the chunk size and
each staged array set's identity; ``maps/<name>/<start>.npz`` holds float16 quotients ``q`` and
float32 ``scale`` of rows [start, start + chunk_rows); ``rows/<start>.npz`` their labels,
predictions and indices. Rows are staged before maps, so a map chunk without its rows was not
written by the store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from roar.core.atomic import replace_atomic
from roar.core.errors import RoarError
from roar.store.format import CHUNK_FILE, FORMAT, ROWS, first_line, json_default, rerun_hint


class Staging:
    """The staging folder of one store: its manifest and its chunk files (``name`` None: the rows)."""

    def __init__(self, root: Path, rerun: str | None = None):
        self.root = root
        self.rerun = rerun
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
                f"{self.manifest_path} is damaged ({first_line(exc)}); delete {self.root} and rerun "
                f"{rerun_hint(self.rerun)}"
            ) from None

    def write_manifest(self, manifest: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(manifest, indent=2, default=json_default).encode() + b"\n"
        replace_atomic(self.manifest_path, lambda f: f.write(text), sync_dir=True)

    def _folder(self, name: str | None) -> Path:
        return self.root / "rows" if name is None else self.root / "maps" / name

    def chunks(self, name: str | None) -> set[int]:
        """Starts of the chunks finished for array set ``name`` (None: the rows' labels and indices)."""
        folder = self._folder(name)
        if not folder.is_dir():
            return set()
        return {int(m.group(1)) for m in map(CHUNK_FILE.match, os.listdir(folder)) if m}

    def save(self, name: str | None, start: int, **arrays: np.ndarray) -> None:
        folder = self._folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        replace_atomic(folder / f"{start:012d}.npz", lambda f: np.savez(f, **arrays))

    def load(self, name: str | None, start: int) -> dict[str, np.ndarray]:
        with np.load(self._folder(name) / f"{start:012d}.npz", allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def discard(self, name: str | None, start: int) -> None:
        (self._folder(name) / f"{start:012d}.npz").unlink(missing_ok=True)

    def set_folders(self) -> list[str]:
        folder = self.root / "maps"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def remove_set(self, name: str) -> None:
        shutil.rmtree(self._folder(name), ignore_errors=True)

    def remove_temporaries(self) -> None:
        """Temporary files of a killed writer (only ever called while holding the store's lock)."""
        remove_temporaries(self.root)
        for sub in ("rows", "maps"):
            folder = self.root / sub
            if folder.is_dir():
                for tmp in folder.rglob(".*.tmp"):
                    tmp.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def load_map(self, name: str, start: int, rows: int, shape: tuple[int, ...]) -> dict | None:
        """A staged chunk of maps, or None if the file is missing or unreadable."""
        try:
            data = self.load(name, start)
        except Exception:
            return None
        q, scale = data.get("q"), data.get("scale", np.empty(0))
        if q is None or q.shape != (rows, *shape) or scale.shape != (rows,):
            return None
        return data

    def load_rows(self, start: int, rows: int, extras: dict | None = None) -> dict | None:
        """A staged chunk of labels, predictions and indices (and the ``extras`` row arrays the store
        declares), or None if missing or unreadable."""
        try:
            data = self.load(None, start)
        except Exception:
            return None
        if any(data.get(key, np.empty(0)).shape != (rows,) for key in ROWS):
            return None
        for name, spec in (extras or {}).items():
            if data.get(name, np.empty(0)).shape != (rows, *spec["shape"]):
                return None
        return data

    def live_manifest(self, consolidated: dict) -> dict | None:
        """The manifest, or None when there is none or every staged set is already consolidated."""
        if not self.root.is_dir():
            return None
        manifest = self.read_manifest()
        if manifest is not None and all(name in consolidated for name in manifest["methods"]):
            return None  # left over from a consolidation that finished but was killed before cleaning up
        return manifest


def remove_temporaries(folder: Path, prefix: str = ".") -> None:
    """``<prefix>*.tmp`` files in ``folder`` left by a killed writer."""
    if folder.is_dir():
        for tmp in folder.glob(f"{prefix}*.tmp"):
            tmp.unlink(missing_ok=True)
