"""What every stage writes next to its outputs so that a result can be traced and repeated:
the resolved config, the seed, roar's version and git commit, the input fingerprints, and the
software and machine it ran on.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import roar
from roar.core.atomic import write_text_atomic
from roar.core.schema import dump_yaml


def git_commit() -> str | None:
    """The commit of the roar source tree (with ``-dirty`` if it has local changes), if in git."""
    root = Path(roar.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def write_json(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def file_hash(*paths: str | Path) -> str:
    """sha256 (16 hex digits) of the files' contents in the given order: the identity of a model
    checkpoint, or of a run's snapshots and final model together."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def run_info(seed: int, inputs: dict[str, str], device: torch.device | None = None) -> dict:
    """What ``provenance.json`` holds: seed, roar's version and commit, input fingerprints, the
    command, the software and the device."""
    return {
        "seed": seed,
        "roar_version": roar.__version__,
        "git_commit": git_commit(),
        "inputs": inputs,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device) if device is not None else None,
        "cuda": torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None,
    }


def record_run(
    stage_dir: str | Path, cfg, inputs: dict[str, str], device: torch.device | None = None, **extra: Any
) -> dict:
    """Write ``config.yaml`` and ``provenance.json`` (with any ``extra`` entries, e.g. the retraining
    recipe a sweep used) into ``stage_dir``; returns the provenance."""
    stage_dir = Path(stage_dir)
    write_text_atomic(stage_dir / "config.yaml", dump_yaml(cfg))
    info = {**run_info(cfg.seed, inputs, device), **extra}
    write_json(stage_dir / "provenance.json", info)
    return info


def fingerprint(value: Any) -> str:
    """sha256 (16 hex digits) of a JSON-able value in canonical form: the short name of a set of inputs."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"dotted.key": leaf}`` (lists and other values are leaves)."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_keys(old: dict, new: dict) -> list[str]:
    """The dotted keys in which two nested dicts of inputs differ (a key only one side has differs too)."""
    old, new = flatten(json.loads(json.dumps(old, default=str))), flatten(json.loads(json.dumps(new, default=str)))
    return [key for key in dict.fromkeys([*new, *old]) if old.get(key, _MISSING) != new.get(key, _MISSING)]


_MISSING = object()
