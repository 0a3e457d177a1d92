"""Peer difficulty scores from the same training snapshots as VoG, and their resumable cache.

Each snapshot contributes three numbers per example, taken from the logits of the pass that
computes its input gradients (so they cost nothing extra): the probability of the true class
p_y, whether the prediction is correct, and EL2N = ‖softmax − onehot(y)‖₂. Across the K
snapshots they give:

* **EL2N** (Paul et al., NeurIPS 2021) at one early snapshot;
* **forgetting events** (Toneva et al., ICLR 2019): correct → incorrect transitions between
  consecutive snapshots. An example never classified correctly at any snapshot gets K, more than
  any learned example can reach (at most K // 2 transitions), as Toneva et al. rank never-learned
  examples above every forgotten one;
* **data-map confidence and variability** (Swayamdipta et al., EMNLP 2020): mean and population
  standard deviation of p_y across the snapshots;
* **GraNd** (Paul et al.) optionally: ‖∇_θ loss(x, y)‖₂ per example at the EL2N snapshot, one
  vectorised pass (``torch.func.vmap``) over the unfolded weights in eval mode.

Only [N] arrays per snapshot are kept, never [N, C] probabilities (ImageNet has 1000 classes).
The cache holds one ``<snapshot>.npz`` per finished snapshot; while a snapshot is computed, each
finished chunk of rows is its own atomically written file, so a killed run recomputes only the
chunks without one (and gathers a snapshot whose chunks are all there). ``identity.json`` records
what the arrays were computed from; a cache of other snapshots or data is discarded and recomputed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from roar.core.atomic import replace_atomic
from roar.core.provenance import changed_keys, write_json

SNAPSHOT_KEYS = ("p_true", "correct", "el2n")  # what every snapshot records
GRAND = "grand"


# ------------------------------------------------------------------------------------ per snapshot


@torch.no_grad()
def snapshot_peers(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """p_true, correct and EL2N [B] from one snapshot's logits [B, C] of examples with ``labels`` [B]."""
    probs = logits.detach().float().softmax(1)
    labels = labels.to(probs.device).view(-1, 1)
    p_true = probs.gather(1, labels).squeeze(1)
    # ‖p − e_y‖² = Σ_c p_c² − 2 p_y + 1: no one-hot matrix is built.
    el2n = (probs.pow(2).sum(1) - 2 * p_true + 1).clamp_min(0).sqrt()
    correct = probs.argmax(1) == labels.squeeze(1)
    return {
        "p_true": p_true.cpu().numpy().astype(np.float32),
        "correct": correct.cpu().numpy(),
        "el2n": el2n.cpu().numpy().astype(np.float32),
    }


def grand_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, chunk: int = 32) -> np.ndarray:
    """‖∇_θ cross-entropy(model(x), y)‖₂ for each example [B] (float32), the model in eval mode.

    ``torch.func.vmap`` over ``grad`` gives every example its own weight gradient in one pass per
    ``chunk`` examples; gradient norms depend on the parametrisation, so pass the model as trained
    (BatchNorm not folded).
    """
    from torch.func import functional_call, grad, vmap

    was_training = model.training
    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss(p, x, y):
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits.float(), y.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    labels = labels.to(images.device)
    out = []
    try:
        for start in range(0, len(images), chunk):
            grads = per_example(params, images[start : start + chunk], labels[start : start + chunk])
            squares = sum(g.float().pow(2).flatten(1).sum(1) for g in grads.values())
            out.append(squares.sqrt().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy().astype(np.float32) if out else np.empty(0, np.float32)


# ------------------------------------------------------------------------------------ across snapshots


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Correct → incorrect transitions between consecutive snapshots, per example, from ``correct``
    [K, N] (training order); examples never correct at any snapshot get K."""
    correct = np.asarray(correct, dtype=bool)
    k = correct.shape[0]
    events = (correct[:-1] & ~correct[1:]).sum(axis=0).astype(np.int64)
    events[~correct.any(axis=0)] = k
    return events


def data_map(p_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Data-map (confidence, variability) per example: mean and population std of p_y over [K, N]."""
    p = np.asarray(p_true, dtype=np.float64)
    return p.mean(axis=0), p.std(axis=0)


def peer_scores(per_snapshot: dict[str, np.ndarray], el2n_at: int, grand: np.ndarray | None = None) -> dict:
    """The peer columns [N] from the stacked per-snapshot arrays ({key: [K, N]})."""
    confidence, variability = data_map(per_snapshot["p_true"])
    scores = {
        "el2n": np.asarray(per_snapshot["el2n"][el2n_at], dtype=np.float64),
        "forgetting": forgetting_events(per_snapshot["correct"]),
        "confidence": confidence,
        "variability": variability,
    }
    if grand is not None:
        scores[GRAND] = np.asarray(grand, dtype=np.float64)
    return scores


# ------------------------------------------------------------------------------------------- cache

IDENTITY_FILE = "identity.json"  # what the cached arrays were computed from
LEGACY_IDENTITY_FILE = "settings.json"  # the same record, as caches written before identity.json hold it
_CHANGES = {"snapshots": "snapshots", "dataset_fingerprint": "data", "n": "data"}


def _normalised(identity: dict) -> dict:
    return json.loads(json.dumps(identity, default=str))


def identity_change(recorded: dict | None, identity: dict) -> str | None:
    """Why a cache recorded as ``recorded`` does not hold scores of ``identity`` ("snapshots changed",
    "data changed", ...), or None when it does."""
    if recorded is None:
        return "its inputs were not recorded"
    changed = changed_keys(recorded, identity)
    if not changed:
        return None
    words = list(dict.fromkeys(_CHANGES.get(key.split(".")[0], key) for key in changed))
    return f"{' and '.join(words)} changed"


class PeerCache:
    """The per-snapshot peer arrays of one split under ``folder``, resumable chunk by chunk.

    ``identity`` (snapshot hash, dataset fingerprint, size) is what the arrays are computed from.
    It is recorded in ``identity.json`` beside them; ``refresh()`` discards a cache recorded with
    another identity (or with none) before anything is added, so scores of other snapshots or data
    are never mixed in nor kept: they are recomputed. Constructing a cache writes nothing.
    """

    def __init__(self, folder: Path, identity: dict, n: int, chunk_rows: int):
        self.folder, self.n, self.chunk_rows = Path(folder), int(n), int(chunk_rows)
        self.identity = _normalised(identity)

    # ------------------------------------------------------------------------------------ identity

    def recorded(self) -> dict | None:
        """The identity the cache's arrays were computed from, as recorded (None if unrecorded or unreadable)."""
        for name in (IDENTITY_FILE, LEGACY_IDENTITY_FILE):
            path = self.folder / name
            if path.is_file():
                try:
                    found = json.loads(path.read_text())
                except (OSError, ValueError):
                    return None
                return found if isinstance(found, dict) else None
        return None

    def change(self) -> str | None:
        """Why the arrays in the folder are not this identity's ("snapshots changed", ...), or None
        when they are (or when there is nothing in the folder). Reads only."""
        if not self._holds_arrays():
            return None
        return identity_change(self.recorded(), self.identity)

    def _holds_arrays(self) -> bool:
        return self.folder.is_dir() and any(
            p.suffix == ".npz" or (p.is_dir() and not p.name.startswith(".")) for p in self.folder.iterdir()
        )

    def refresh(self) -> str | None:
        """Make the folder this identity's before anything is computed: arrays recorded with another
        identity (or none) are deleted. Returns why they were (None if nothing was discarded)."""
        reason = self.change()
        if reason is not None:
            # The record goes first: a kill during the clean-up leaves arrays without one, discarded next time.
            for name in (IDENTITY_FILE, LEGACY_IDENTITY_FILE):
                (self.folder / name).unlink(missing_ok=True)
            for path in self.folder.iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.suffix == ".npz":
                    path.unlink(missing_ok=True)
        if reason is not None or not (self.folder / IDENTITY_FILE).is_file() or self.recorded() != self.identity:
            write_json(self.folder / IDENTITY_FILE, self.identity)
            (self.folder / LEGACY_IDENTITY_FILE).unlink(missing_ok=True)
        return reason

    # -------------------------------------------------------------------------------------- arrays

    def _final(self, snapshot: str) -> Path:
        return self.folder / f"{snapshot}.npz"

    def _chunk(self, snapshot: str, start: int) -> Path:
        return self.folder / snapshot / f"{start:012d}.npz"

    def _end(self, start: int) -> int:
        return min(start + self.chunk_rows, self.n)

    @staticmethod
    def _read(path: Path, keys: tuple[str, ...], rows: int) -> dict[str, np.ndarray] | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in keys}
        except Exception:
            return None
        return arrays if all(a.shape == (rows,) for a in arrays.values()) else None

    def load(self, snapshot: str, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
        """The snapshot's arrays [N] if it is finished with every key in ``keys``, else None."""
        path = self._final(snapshot)
        return self._read(path, keys, self.n) if path.exists() else None

    def pending(self, snapshot: str, keys: tuple[str, ...]) -> set[int]:
        """Starts of the chunks of ``snapshot`` still to compute (all keys present counts as done)."""
        if self.load(snapshot, keys) is not None:
            return set()
        return {
            start
            for start in range(0, self.n, self.chunk_rows)
            if self._read(self._chunk(snapshot, start), keys, self._end(start) - start) is None
        }

    def save(self, snapshot: str, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Rows [start, ...) of ``arrays`` (each [rows]) as whole chunks, each written atomically."""
        rows = len(next(iter(arrays.values())))
        for chunk in range(start, start + rows, self.chunk_rows):
            a, b = chunk - start, self._end(chunk) - start
            part = {key: np.ascontiguousarray(value[a:b]) for key, value in arrays.items()}
            replace_atomic(self._chunk(snapshot, chunk), lambda f, part=part: np.savez(f, **part))

    def finish(self, snapshot: str, keys: tuple[str, ...]) -> bool:
        """Gather a snapshot's chunks into ``<snapshot>.npz`` once all are there; True when finished.

        Safe to call at any time, and what a resumed run calls first for every snapshot: chunks that
        are all saved (a run killed before it gathered them) are gathered, and the chunk folder a run
        killed just after gathering left behind is removed."""
        if self.load(snapshot, keys) is not None:
            if (self.folder / snapshot).is_dir():
                shutil.rmtree(self.folder / snapshot, ignore_errors=True)
            return True
        parts = []
        for start in range(0, self.n, self.chunk_rows):
            part = self._read(self._chunk(snapshot, start), keys, self._end(start) - start)
            if part is None:
                return False
            parts.append(part)
        arrays = {key: np.concatenate([p[key] for p in parts]) for key in keys}
        replace_atomic(self._final(snapshot), lambda f: np.savez(f, **arrays))
        shutil.rmtree(self.folder / snapshot, ignore_errors=True)
        return True
