"""The run's cross-fitted hardness predictors, in ``<run>/insecurity/hardness/``.

The ``hp`` score needs one predictor per fold of the split (``roar.insecurity.hardness`` says why
the targets must be held-out predictions). Each fold's predictor is saved as soon as it is trained,
with the inputs it was trained from (model, data, layer, settings, seed, the rows fitted on): a
killed run trains only the folds still missing, and a rerun whose inputs changed retrains them all
and says so. Checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from roar.config import InsecurityConfig
from roar.core.provenance import changed_keys, fingerprint, write_json
from roar.data import ImageSplit
from roar.insecurity.hardness import (
    HardnessPredictor,
    fit_predictor,
    fold_assignment,
    hardness_targets,
    predict_hardness,
)
from roar.insecurity.maps import SCORES
from roar.training.checkpoint import save_atomic


@dataclass
class Predictors:
    """The fold predictors, which fold scores each row of the split, and how well they predict errors."""

    heads: list[HardnessPredictor]
    fold_of: np.ndarray  # int64 [len(split)]: the fold whose predictor scores each row (never one that saw it)
    digest: str  # changes whenever any predictor's weights do
    report: dict = field(default_factory=dict)
    note: str = ""  # why they were retrained, if they were


def fit_rows(n: int, ic: InsecurityConfig, seed: int) -> np.ndarray:
    """The rows the predictors are fitted on: all, or a seeded subset of ``hardness.max_images``."""
    limit = ic.hardness.max_images
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 17]).choice(n, size=limit, replace=False))


@torch.no_grad()
def features_and_logits(
    model: nn.Module, split: ImageSplit, rows: np.ndarray, layer: nn.Module, device, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer features [n, K, h, w] (on ``device``) and logits [n, C] of the given rows, batch by batch."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output.detach().float()))
    features, logits = [], []
    try:
        for start in range(0, len(rows), batch_size):
            images = split.read(rows[start : start + batch_size]).to(device).float() / 255
            captured.clear()
            logits.append(model(images).float())
            features.append(captured[-1].contiguous())
    finally:
        handle.remove()
    return torch.cat(features), torch.cat(logits)


def _auroc(errors: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(errors, scores)) if 0 < errors.sum() < len(errors) else float("nan")


def ensure_predictors(
    folder: Path,
    ic: InsecurityConfig,
    seed: int,
    model: nn.Module,
    split: ImageSplit,
    layer: nn.Module,
    inputs: dict,
    device,
) -> Predictors:
    """The fold predictors for this run: loaded when saved from the same ``inputs``, else trained."""
    hc = ic.hardness
    rows = fit_rows(len(split), ic, seed)
    inputs = {**inputs, "hardness": hc.model_dump(mode="json"), "seed": seed, "rows": fingerprint(rows.tolist())}
    folder.mkdir(parents=True, exist_ok=True)
    feats, logits = features_and_logits(model, split, rows, layer, device, ic.batch_size)
    labels = split.labels[torch.as_tensor(rows)].to(device)
    targets = hardness_targets(logits, labels)
    folds = fold_assignment(len(rows), hc.folds, seed).to(device)
    heads, changed = [], None
    for k in range(hc.folds):
        path = folder / f"fold_{k}.pt"
        head, why = _load(path, inputs, feats.shape[1], hc.hidden)
        if head is None:
            changed = changed or why
            train = folds != k
            head = fit_predictor(
                feats[train],
                targets[train],
                hidden=hc.hidden,
                epochs=hc.epochs,
                lr=hc.lr,
                weight_decay=hc.weight_decay,
                batch_size=hc.batch_size,
                seed=seed + k,
            )
            save_atomic({"state": head.state_dict(), "inputs": inputs}, path)
        heads.append(head.to(device).eval().requires_grad_(False))
    for stale in folder.glob("fold_*.pt"):  # folds of an earlier run with more of them
        if int(stale.stem.split("_")[1]) >= hc.folds:
            stale.unlink()
    held_out = torch.empty(len(rows), device=device)
    for k, head in enumerate(heads):
        held_out[folds == k] = predict_hardness(head, feats[folds == k]).to(device)
    fold_of = np.zeros(len(split), dtype=np.int64)  # rows outside the fitted subset: no predictor saw them
    fold_of[rows] = folds.cpu().numpy()
    report = _report(logits, labels, targets, held_out, hc.folds)
    write_json(folder / "report.json", {**report, "inputs": inputs})
    digest = fingerprint([{k: v.tolist() for k, v in head.state_dict().items()} for head in heads])
    return Predictors(heads, fold_of, digest, report, f"hardness predictor retrained: {changed}" if changed else "")


def _load(path: Path, inputs: dict, channels: int, hidden: int) -> tuple[HardnessPredictor | None, str]:
    """A saved fold predictor trained from ``inputs``, or None and why it cannot be reused."""
    if not path.exists():
        return None, ""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        recorded = saved["inputs"]
        if recorded != inputs:
            return None, "settings changed: " + ", ".join(changed_keys(recorded, inputs))
        head = HardnessPredictor(channels, hidden)
        head.load_state_dict(saved["state"])
        return head, ""
    except Exception:  # unreadable or from another version: train again
        return None, "an unreadable predictor file"


def _report(logits, labels, targets, held_out, folds: int) -> dict:
    """How well each difficulty score flags the classifier's errors on the fitted rows (held-out hp)."""
    errors = (logits.argmax(1) != labels).cpu().numpy()
    scores = {name: fn(logits, None).cpu().numpy() for name, fn in SCORES.items()}
    scores["hp"] = held_out.cpu().numpy()
    t = targets.cpu().numpy()
    return {
        "images": int(len(errors)),
        "errors": int(errors.sum()),
        "folds": folds,
        "auroc_error": {name: _auroc(errors, values) for name, values in scores.items()},
        "correlation_target": {
            name: float(np.corrcoef(values, t)[0, 1]) if values.std() > 0 and t.std() > 0 else float("nan")
            for name, values in scores.items()
        },
    }
