"""Checkpoints that describe themselves and never leave a half-written file behind.

A checkpoint holds the model, optimiser and scheduler state, the epoch and step, and what is
needed to rebuild the model without the original config (class names, geometry, normalisation).
Files are written to a temporary name and renamed, so a kill at any moment leaves either the
previous checkpoint or the new one. Loading always uses ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from roar.core.atomic import replace_atomic
from roar.core.errors import RoarError
from roar.core.provenance import changed_keys


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` through ``replace_atomic``: a kill leaves the previous checkpoint or the new one."""
    replace_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint saved by roar, loaded safely; a missing or damaged file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise RoarError(f"checkpoint not found: {path} (run 'roar train' first)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RoarError(
            f"checkpoint {path} is damaged or not a roar checkpoint: {str(exc).splitlines()[0][:200]}"
        ) from None


def _decoded(fingerprint: dict) -> dict:
    """A checkpoint fingerprint with its JSON-text entries parsed, so that a difference names the nested key."""
    out = {}
    for key, value in fingerprint.items():
        try:
            out[key] = json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value
        except ValueError:
            out[key] = value
    return out


def check_resumable(state: dict | None, fingerprint: dict, path: str | Path) -> None:
    """RoarError naming what differs if checkpoint ``state`` (loaded from ``path``) was made for another
    setup than ``fingerprint``: resuming it would continue someone else's training."""
    if state is None or state.get("fingerprint") == fingerprint:
        return
    changed = changed_keys(_decoded(state.get("fingerprint") or {}), _decoded(fingerprint))
    raise RoarError(
        f"{path} was written by a different setup (differs in: {', '.join(changed) or 'unknown'}); "
        "choose another output_dir or rerun with --restart"
    )
