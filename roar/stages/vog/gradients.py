"""Per-snapshot input gradients of every example, stored for VoG.

For each training snapshot θ_t (in training order) and each example (x, y) of a split,
S_t = ∂ logit_y(x; θ_t) / ∂x with the model in eval mode, averaged over the colour channels
(Agarwal, D'souza and Hooker, CVPR 2022). One backward pass per chunk of ``max_batch`` images
gives every image its own gradient (``input_gradients`` with the labels as targets).

The gradients of a split go to ``<run>/vog/gradients/<split>.h5``, an array store (see
``roar.store``) in which each snapshot is one array set named by its file stem (``epoch_0003``)
whose identity is the snapshot it was computed from, {epoch, step}: float16 with a float32 scale
per map, chunked, compressed, staged chunk by chunk and resumable after a kill at any moment. The
store-wide identity says what the maps are (``IDENTITY``), and the store's model hash is a hash
over every snapshot file and the final model (whose predictions it records), so gradients of
other weights are never mixed in. Stores written before the store took caller-given identities
describe the same maps as attribution "methods" (``LEGACY_IDENTITY``); they read, resume and
extend in that layout. ``open_gradients`` presents a split's store as a lazy [K, N, H, W] float32
array that ``vog_scores`` streams over in bounded memory.

The logits of the same pass feed the peer scores (``roar.vog.peers``) at no extra cost; when the
gradients are already stored and only the peers are missing, a forward pass suffices.

``roar vog --shard i/n`` (or one shard per torchrun rank) computes the gradients of rows [lo, hi)
of every snapshot into ``<split>.shard-<i>-of-<n>.h5``, over whole batches of one process's grid,
as ``roar extract --shard`` does (``roar.store.shards``); the shard that finds every shard
finished stitches them into ``<split>.h5`` with HDF5 virtual datasets. The gradients are the
expensive part (a backward pass per snapshot and image); the peers and the scores then need one
``roar vog`` in one process, whose forward passes read the merged store.
"""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from roar.attribution.engine import input_gradients, max_batch_for, predict, prepare_model
from roar.config import RunConfig
from roar.core.device import pin_memory
from roar.core.errors import RoarError
from roar.core.provenance import git_commit
from roar.data import Dataset, ImageSplit
from roar.store import MapStore, StoreWriter, staging_path
from roar.store.format import map_shape
from roar.store.shards import SHARD, merge_when_last, shard_identity, shard_path
from roar.store.shards import shard_rows as rows_of_shard
from roar.training.checkpoint import load_checkpoint
from roar.vog.peers import GRAND, SNAPSHOT_KEYS, PeerCache, grand_norms, snapshot_peers

METHOD = "vog_input_gradient"  # what every stored map is: ∂ logit_y / ∂x averaged over the channels
IDENTITY = {"content": METHOD}  # the gradient store's store-wide identity; each snapshot's is {epoch, step}
# The earlier layout: every snapshot a "method" METHOD with params {epoch, step}, the store-wide
# identity the attribution stage's fields.
REDUCTION = "channel_mean"
TARGET = "label"
LEGACY_IDENTITY = {"reduction": REDUCTION, "target": TARGET}
RERUN = "roar vog"  # what recreates a gradient store, for its error messages
RETRAIN = "set training.snapshots (e.g. --set training.snapshots.epochs=all) and retrain with 'roar train --restart'"
_SNAPSHOT_NAME = re.compile(r"^(epoch|step)_(\d+)$")


# ------------------------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Snapshot:
    """One saved copy of the weights: ``name`` is the file stem, ``epoch`` may be fractional for step snapshots."""

    name: str
    path: Path
    epoch: int | float
    step: int


def snapshot_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "train" / "snapshots"


def gradient_path(cfg: RunConfig, split: str) -> Path:
    return cfg.run_dir / "vog" / "gradients" / f"{split}.h5"


def peer_cache(cfg: RunConfig, split_name: str, split: ImageSplit, model_hash: str, chunk_rows: int = 1) -> PeerCache:
    """The peer arrays of a split (``<run>/vog/peers/<split>/``) for the snapshots hashed as ``model_hash``."""
    identity = {"snapshots": model_hash, "dataset_fingerprint": split.fingerprint(), "n": len(split)}
    return PeerCache(cfg.run_dir / "vog" / "peers" / split_name, identity, len(split), chunk_rows)


def _snapshot_info(path: Path) -> tuple[int | float, int]:
    """(epoch, step) of a snapshot file without reading its weights (memory-mapped where possible)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        state = load_checkpoint(path)  # the same load, for its one-line error
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise RoarError(f"{path} is not a training snapshot saved by 'roar train'; remove it from {path.parent}")
    epoch = float(state.get("epoch", 0))
    return (int(epoch) if epoch.is_integer() else epoch), int(state["step"])


def find_snapshots(folder: str | Path) -> list[Snapshot]:
    """The snapshots in ``folder`` in training order (by step, then epoch).

    An epoch snapshot and a step snapshot taken after the same optimiser step hold the same
    weights; only the epoch one is kept, so that no weights count twice in VoG.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.pt") if _SNAPSHOT_NAME.match(p.stem)) if folder.is_dir() else []
    if not files:
        raise RoarError(f"no training snapshots in {folder}: VoG needs weights saved during training; {RETRAIN}")
    found = [Snapshot(p.stem, p, *_snapshot_info(p)) for p in files]
    found.sort(key=lambda s: (s.step, s.epoch, not s.name.startswith("epoch_"), s.name))
    unique: list[Snapshot] = []
    for s in found:
        if not unique or unique[-1].step != s.step:
            unique.append(s)
    if len(unique) < 2:
        raise RoarError(
            f"VoG needs at least 2 training snapshots, {folder} has {len(unique)} ({unique[0].name}); {RETRAIN}"
        )
    return unique


def _state_problem(model: nn.Module, state: dict) -> str | None:
    """How ``state`` fails to fit ``model`` (missing, unexpected or differently shaped tensors), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        return f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    if unexpected:
        return f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            return f"{key} has shape {list(state[key].shape)}, the model's is {list(value.shape)}"
    return None


def _fitting_weights(template: nn.Module, snapshot: Snapshot, state, model_path: Path) -> dict:
    """The weights of a loaded snapshot ``state``, checked to fit ``template`` (the run's final model)."""
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise RoarError(f"{snapshot.path} is not a training snapshot saved by 'roar train'")
    problem = _state_problem(template, weights)
    if problem:
        raise RoarError(
            f"snapshot {snapshot.path} does not fit the model of {model_path} ({problem}): it was saved for another "
            f"model or dataset; {RETRAIN}"
        )
    return weights


def load_weights(template: nn.Module, snapshot: Snapshot, model_path: Path) -> dict:
    """The snapshot's weights, checked to fit ``template`` (the run's final model)."""
    return _fitting_weights(template, snapshot, load_checkpoint(snapshot.path), model_path)


def check_snapshots(template: nn.Module, snapshots: list[Snapshot], model_path: Path) -> None:
    """Refuse, before anything is written, a snapshot that does not fit ``template`` (the run's final
    model). Only the tensors' shapes are read (memory-mapped), not the weights."""
    for snapshot in snapshots:
        try:
            state = torch.load(snapshot.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            state = load_checkpoint(snapshot.path)  # the same load, for its one-line error
        _fitting_weights(template, snapshot, state, model_path)


def load_snapshot(template: nn.Module, snapshot: Snapshot, model_path: Path) -> tuple[nn.Module, dict]:
    """A copy of ``template`` (the run's final model) holding the snapshot's weights, and those weights."""
    weights = load_weights(template, snapshot, model_path)
    model = copy.deepcopy(template)
    model.load_state_dict(weights)
    return model.eval(), weights


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# ---------------------------------------------------------------------------------------------- reader


class GradientStack:
    """A split's stored VoG gradients as a lazy [K, N, H, W] float32 array.

    ``g[k, a:b]`` dequantises rows [a, b) of snapshot k (training order) and nothing else, which
    is what ``vog_scores`` needs to stream over a split of any size. ``np.asarray(g)`` loads all.
    """

    def __init__(self, store: MapStore):
        self.store = store
        snapshots = {name: _snapshot_identity(store, name) for name in store.methods}
        if any(identity is None for identity in snapshots.values()):
            raise RoarError(f"{store.path} is not a VoG gradient store (it holds {', '.join(store.methods)})")
        order = sorted(snapshots, key=lambda m: (int(snapshots[m]["step"]), float(snapshots[m]["epoch"])))
        self.snapshots = order
        self.epochs = [float(snapshots[m]["epoch"]) for m in order]
        self.steps = [int(snapshots[m]["step"]) for m in order]
        self.shape = (len(order), store.n, *store.geometry[1:])
        self.labels, self.predictions, self.indices = store.labels, store.predictions, store.indices

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        k, rows, rest = key[0], key[1] if len(key) > 1 else slice(None), key[2:]
        if isinstance(k, slice):
            return np.stack([self[(i, rows, *rest)] for i in range(*k.indices(len(self)))])
        k = int(k)
        if not -len(self) <= k < len(self):
            raise IndexError(f"snapshot {k} outside 0..{len(self) - 1}")
        name = self.snapshots[k]
        if isinstance(rows, slice):
            a, b, step = rows.indices(self.shape[1])
            block = self.store.read(name, a, max(a, b)) if step == 1 else self.store.read(name)[a:b:step]
        else:
            i = int(rows) + (self.shape[1] if int(rows) < 0 else 0)
            block = self.store.read(name, i, i + 1)[0]
        return block[(slice(None), *rest)] if rest and isinstance(rows, slice) else block[rest] if rest else block

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.stack([self.store.read(name) for name in self.snapshots])
        return out if dtype is None else out.astype(dtype)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> GradientStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _snapshot_identity(store: MapStore, name: str) -> dict | None:
    """{epoch, step} of a stored snapshot, in either layout; None if the set is not a VoG gradient."""
    identity = store.identity_of(name)
    if store.identity == IDENTITY and identity.keys() == {"epoch", "step"}:
        return identity
    if store.identity == LEGACY_IDENTITY and identity.get("method") == METHOD:
        params = identity.get("params") or {}
        return params if params.keys() >= {"epoch", "step"} else None
    return None


def open_gradients(path: str | Path) -> GradientStack:
    """The finished gradient store at ``path`` as a [K, N, H, W] array (close it, or use ``with``)."""
    store = MapStore.open(path, rerun=RERUN)
    try:
        return GradientStack(store)
    except BaseException:
        store.close()
        raise


# ------------------------------------------------------------------------------------------ computing


@dataclass
class PeerPlan:
    """Which peers to record: ``grand_at`` is the snapshot position whose GraNd is computed (or None)."""

    enabled: bool
    grand_at: int | None = None

    def keys(self, position: int) -> tuple[str, ...]:
        return SNAPSHOT_KEYS + ((GRAND,) if position == self.grand_at else ())


class _Writes:
    """Store and cache writes, in submission order. With ``background`` they run on one worker thread
    so that the next batch's passes overlap them (on an accelerator the CPU is idle during the passes);
    on the CPU they run inline, since the passes already use every core and a writer thread would
    only compete with them for the cores and the GIL (measured: slightly slower). At most ``depth``
    batches wait, which bounds memory; ``close`` waits for every queued write and raises the first error."""

    def __init__(self, background: bool, depth: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roar-vog-write") if background else None
        self._futures: deque[Future] = deque()
        self.depth = depth

    def submit(self, fn: Callable, *args) -> None:
        if self._pool is None:
            fn(*args)
            return
        self._futures.append(self._pool.submit(fn, *args))
        while len(self._futures) > self.depth:
            self._futures.popleft().result()

    def close(self) -> None:
        if self._pool is None:
            return
        try:
            while self._futures:
                self._futures.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


def _images(split: ImageSplit, source, a: int, b: int, device: torch.device, workers: int) -> torch.Tensor:
    """Images [0, 1] float of rows [a, b) on ``device``: a slice of the (pinned) uint8 tensor in memory,
    loader workers from disk."""
    batch = source[a:b] if source is not None else split.read(slice(a, b), workers, pin_memory(device))
    return batch.to(device, non_blocking=True).float().div_(255)


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, max_batch: int) -> torch.Tensor:
    return torch.cat([model(images[i : i + max_batch]).float() for i in range(0, len(images), max_batch)])


def gradient_batch(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, max_batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [B, H, W]: ∂ logit_y / ∂x averaged over channels, logits [B, C]) from one batched pass."""
    captured: list[torch.Tensor] = []

    def keep(logits: torch.Tensor) -> torch.Tensor:
        captured.append(logits.detach())
        return logits

    grads = input_gradients(model, images, labels, max_batch=max_batch, output=keep)
    return grads.mean(dim=1), torch.cat(captured)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str):
    """Add the wall time of the block to ``seconds[key]`` (on an accelerator, up to the next sync)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0


def _chunks(a: int, b: int, rows: int) -> range:
    return range(a, b, rows)


def _store_identities(path: Path, snapshots: list[Snapshot]) -> tuple[dict, dict[str, dict]]:
    """The store-wide identity and each snapshot's, in the layout of the store already at ``path``
    (so that a store begun in the earlier layout resumes instead of being refused), else today's."""
    legacy = False
    if path.exists() or staging_path(path).exists():
        try:
            with MapStore.open(path, require_complete=False, rerun=RERUN) as store:
                legacy = store.identity == LEGACY_IDENTITY
        except RoarError:
            pass  # the writer reports what is wrong with it
    if legacy:
        return LEGACY_IDENTITY, {
            s.name: {"method": METHOD, "params": {"epoch": s.epoch, "step": s.step}} for s in snapshots
        }
    return IDENTITY, {s.name: {"epoch": s.epoch, "step": s.step} for s in snapshots}


def shard_rows(cfg: RunConfig, dataset: Dataset, split_name: str, shard: tuple[int, int]) -> tuple[int, int, int]:
    """(lo, hi, chunk rows) of shard ``(i, n)`` of a split: whole batches of one process's grid."""
    split = dataset.split(split_name)
    row_bytes = 2 * int(np.prod(map_shape(split.geometry, False)))
    return rows_of_shard(len(split), row_bytes, cfg.vog.batch_size, shard, split_name)


def merge_shards(cfg: RunConfig, count: int, again: bool = True) -> list[Path]:
    """Stitch each split's ``count`` finished gradient shards into ``<split>.h5`` (``roar merge --vog``);
    the stores merged here. ``again=False`` (the shard that finished last) leaves one already merged."""
    merged = [merge_when_last(gradient_path(cfg, split), count, RERUN, again) for split in cfg.vog.splits]
    return [path for path in merged if path is not None]


def _discard_other_store(
    path: Path, dataset: Dataset, split_name: str, split: ImageSplit, model_hash: str, rows: int | None = None
) -> str | None:
    """Delete the gradient store at ``path`` (finished or staged) when it was made from other snapshots
    or data, so that it is recomputed rather than refused; returns why ("snapshots changed", ...)
    or None when there is none or it is this run's. A store that cannot be read is left to the writer."""
    staging = staging_path(path)
    if not path.exists() and not staging.exists():
        return None
    try:
        with MapStore.open(path, require_complete=False, rerun=RERUN) as store:
            attrs = store.attrs
            changed = []
            if attrs.get("model_hash") != model_hash:
                changed.append("snapshots")
            data = (
                attrs.get("dataset") == dataset.name
                and store.n == (len(split) if rows is None else rows)
                and list(store.geometry) == [int(x) for x in split.geometry]
                and attrs.get("dataset_fingerprint") == split.fingerprint()
                and store.split == split_name
            )
            if not data:
                changed.append("data")
    except RoarError:
        return None
    if not changed:
        return None
    path.unlink(missing_ok=True)  # a kill in between leaves a staging folder of the same origin, discarded next time
    shutil.rmtree(staging, ignore_errors=True)
    return f"{' and '.join(changed)} changed"


def compute_split(
    cfg: RunConfig,
    dataset: Dataset,
    split_name: str,
    snapshots: list[Snapshot],
    final_model: nn.Module,
    model_path: Path,
    model_hash: str,
    device: torch.device,
    peers: PeerPlan,
    on_batch: Callable[[], None] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """Gradients (and peer arrays) of every snapshot for one split, resuming whatever is stored.

    Returns {"split", "images", "snapshots", "passes": snapshot passes run, "gradients_recomputed" and
    "peers_recomputed": why the split's stored gradients or cached peer arrays were discarded (None if
    they were not), "batches": batches run,
    "seconds": wall time spent loading and preparing snapshots ("models"), in the gradient and forward
    passes ("passes"), writing chunks ("writes") and consolidating the store ("consolidation")}.

    With ``shard`` (i, n), n > 1: the gradients of shard i's rows alone, into its shard store (no peers).
    """
    split = dataset.split(split_name)
    vc = cfg.vog
    n = len(split)
    path = gradient_path(cfg, split_name)
    lo, hi, chunk_rows = (0, n, None) if shard[1] == 1 else shard_rows(cfg, dataset, split_name, shard)
    if shard[1] > 1:
        path = shard_path(path, *shard)
        peers = PeerPlan(False)
    gradients_recomputed = _discard_other_store(path, dataset, split_name, split, model_hash, hi - lo)
    identity, methods = _store_identities(path, snapshots)
    if shard[1] > 1:
        identity = {**identity, SHARD: shard_identity(*shard, lo, hi, n)}
    writer = StoreWriter(
        path,
        split=split_name,
        n=hi - lo,
        geometry=split.geometry,
        dataset=dataset.name,
        dataset_fingerprint=split.fingerprint(),
        model_hash=model_hash,
        channels=False,
        methods=methods,
        identity=identity,
        rerun=RERUN,
        provenance={
            "seed": cfg.seed,
            "git_commit": git_commit(),
            "config": cfg.model_dump(mode="json"),
            "model": str(model_path),
            "snapshots": [{"name": s.name, "epoch": s.epoch, "step": s.step} for s in snapshots],
        },
        compression=None if vc.compression == "none" else vc.compression,
        chunk_rows=chunk_rows,
    )
    with writer:
        rows = writer.chunk_rows()
        cache, recomputed = None, None
        if peers.enabled:
            cache = peer_cache(cfg, split_name, split, model_hash, rows)
            recomputed = cache.refresh()
        step = max(rows, (vc.batch_size // rows) * rows)
        grid = [(a, min(a + step, hi)) for a in range(lo, hi, step)]  # rows of the split
        work = []
        for position, snap in enumerate(snapshots):
            grad_todo = {lo + c for a, b in writer.pending(snap.name) for c in _chunks(a, b, rows)}
            peer_todo = set()
            if cache is not None:
                keys = peers.keys(position)
                peer_todo = cache.pending(snap.name, keys)
                if not peer_todo:
                    cache.finish(snap.name, keys)  # chunks all saved by a run killed before it gathered them
            batches = []
            for a, b in grid:
                chunks = set(_chunks(a, b, rows))
                if chunks & (grad_todo | peer_todo):
                    batches.append((a, b, bool(chunks & grad_todo), chunks & peer_todo))
            if batches:
                work.append((position, snap, batches))
        seconds: dict[str, float] = {}
        passes = _run(
            work,
            split,
            cfg,
            writer,
            cache,
            final_model,
            model_path,
            device,
            peers,
            rows,
            on_batch,
            split_name,
            seconds,
            lo,
        )
        with _timed(seconds, "consolidation"):
            writer.finish()
    return {
        "split": split_name,
        "images": n,
        **({"rows": [lo, hi]} if shard[1] > 1 else {}),
        "snapshots": len(snapshots),
        "passes": passes,
        "gradients_recomputed": gradients_recomputed,
        "peers_recomputed": recomputed,
        "batches": sum(len(batches) for _, _, batches in work),
        "seconds": {key: round(value, 3) for key, value in seconds.items()},
    }


def _run(
    work, split, cfg, writer, cache, final_model, model_path, device, peers, rows, on_batch, split_name, seconds, lo=0
) -> int:
    """The snapshot passes of ``work``; the snapshot whose weights equal the final model's goes first,
    so that its logits give the final predictions the store records without another pass. Batches are
    in rows of the split; the writer's rows start at ``lo`` (a shard's first row)."""
    if not work:
        return 0
    vc = cfg.vog
    n = len(split)
    max_batch = max_batch_for(device, vc.max_batch)
    source = split.images.pin_memory() if split.in_memory and pin_memory(device) else split.images
    probe = _images(split, source, 0, min(16, n), device, 0)
    predictions = np.full(n, -1, dtype=np.int64)
    loaded = {}
    _, last, _ = work[-1]
    weights = load_weights(final_model, last, model_path)
    final_position = None
    if _same_weights(weights, final_model.state_dict()):
        final_position = work[-1][0]
        work = [work[-1], *work[:-1]]
        loaded[last.name] = weights
    final_prepared = None
    raw = copy.deepcopy(final_model).eval()  # holds each snapshot's weights in turn
    total = sum(len(batches) for _, _, batches in work)
    bar = tqdm(total=total, desc=f"vog {split_name}", unit="batch", disable=None, leave=False)
    writes = _Writes(background=device.type != "cpu")
    try:
        for position, snap, batches in work:
            bar.set_postfix_str(snap.name)
            with _timed(seconds, "models"):
                weights = loaded.pop(snap.name, None)
                raw.load_state_dict(weights if weights is not None else load_weights(final_model, snap, model_path))
                model = prepare_model(raw, device, probe=probe)
            keys = peers.keys(position)
            for a, b, needs_grad, peer_chunks in batches:
                images = _images(split, source, a, b, device, cfg.training.num_workers)
                labels = split.labels[a:b].to(device, non_blocking=True)
                with _timed(seconds, "passes"):
                    if needs_grad:
                        maps, logits = gradient_batch(model, images, labels, max_batch)
                        if position == final_position:
                            predictions[a:b] = logits.argmax(1).cpu().numpy()
                        elif (predictions[a:b] < 0).any():
                            if final_prepared is None:
                                final_prepared = prepare_model(final_model, device, probe=probe)
                            missing = lo + np.flatnonzero(predictions[lo : lo + writer.n] < 0)
                            predictions[missing] = _predict_rows(final_prepared, split, source, missing, device, cfg)
                    elif peer_chunks:
                        logits = _logits(model, images, max_batch)
                    arrays = snapshot_peers(logits, labels) if peer_chunks and cache is not None else {}
                    if arrays and GRAND in keys:
                        arrays[GRAND] = grand_norms(raw, images, labels)
                with _timed(seconds, "writes"):
                    if needs_grad:
                        row_info = (labels.cpu(), predictions[a:b].copy(), np.arange(a, b))
                        writes.submit(writer.write, a - lo, {snap.name: maps.cpu().numpy()}, *row_info)
                    for chunk in sorted(peer_chunks) if arrays else []:
                        c, d = chunk - a, min(chunk + rows, b) - a
                        writes.submit(cache.save, snap.name, chunk, {k: v[c:d] for k, v in arrays.items()})
                bar.update()
                if on_batch is not None:
                    on_batch()
            if cache is not None:
                with _timed(seconds, "writes"):
                    writes.submit(cache.finish, snap.name, keys)
    finally:
        with _timed(seconds, "writes"):
            writes.close()  # every finished batch reaches the disk, even when interrupted
        bar.close()
    return len(work)


def _predict_rows(model, split, source, rows: np.ndarray, device, cfg) -> np.ndarray:
    """The final model's predictions of ``rows`` (the whole split at most), batch by batch."""
    out = np.empty(len(rows), dtype=np.int64)
    step = max(1, cfg.vog.batch_size)
    for i in range(0, len(rows), step):
        part = rows[i : i + step]
        a, b = int(part[0]), int(part[-1]) + 1
        images = _images(split, source, a, b, device, cfg.training.num_workers)
        pred = predict(model, images, cfg.vog.max_batch).cpu().numpy()
        out[i : i + len(part)] = pred[part - a]
    return out
