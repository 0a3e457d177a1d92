"""``roar extract``: every configured method over whole splits, into the attribution store.

Batches lie on a fixed grid of ``batch_size`` rows (a multiple of the store's chunk), and each
method's random stream is seeded by (seed, split, method, batch start): a resumed extraction
recomputes exactly the maps an uninterrupted one would have written, and adding a method to a
finished store computes only that method. Methods that share passes (``shared_key``) are
computed once per batch. Methods that need the model's signal patterns (PatternNet,
PatternAttribution, PGIG) get them from ``roar.stages.patterns``, estimated on first use and reused
after; their digest goes into the provenance and into the identity of every map computed with them.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from roar.attribution import METHODS, Attribution, Context, PluginAttribution, create
from roar.attribution.engine import predict, prepare_model
from roar.config import MethodEntry, RunConfig
from roar.core.device import resolve_device
from roar.core.errors import RoarError
from roar.core.locks import output_folder
from roar.core.provenance import file_hash, git_commit, record_run, write_json
from roar.data import Dataset, build_dataset
from roar.perturb.reduce import reduce_map
from roar.stages.patterns import ensure as ensure_patterns
from roar.stages.patterns import stale_reason
from roar.stages.result import StageResult
from roar.stages.train import load_run_model
from roar.store import MapStore, StoreWriter
from roar.store.format import map_shape
from roar.store.shards import SHARD, merge_when_last, parse_shard, shard_identity, shard_path, shard_paths
from roar.store.shards import shard_rows as rows_of_shard

RERUN = "roar extract"  # what recreates a store, for its error messages


def store_path(cfg: RunConfig, split: str) -> Path:
    return cfg.run_dir / "attributions" / f"{split}.h5"


def trained_model_hash(cfg: RunConfig) -> str:
    """The hash of the run's trained model (``<run>/train/model.pt``): what its maps were computed from."""
    path = cfg.run_dir / "train" / "model.pt"
    if not path.exists():
        raise RoarError(f"no trained model at {path}: run 'roar train' first")
    return file_hash(path)


def open_maps(cfg: RunConfig, dataset: Dataset, split_name: str) -> MapStore:
    """The run's stored maps of a split, checked against the dataset a stage will read them with and
    against the run's trained model (maps of an earlier model are refused, never reused)."""
    split = dataset.split(split_name)
    store = MapStore.open(store_path(cfg, split_name), rerun=RERUN)
    try:
        store.validate_for(
            dataset=dataset.name,
            split=split_name,
            n=len(split),
            geometry=split.geometry,
            dataset_fingerprint=split.fingerprint(),
            model_hash=trained_model_hash(cfg),
        )
    except BaseException:
        store.close()
        raise
    return store


def build_method(entry: MethodEntry, max_batch: int | None) -> Attribution:
    """The method of a config entry; ``max_batch`` fills in where the entry does not set it."""
    if entry.is_plugin:
        return PluginAttribution(method=entry.method, kwargs=entry.params.get("kwargs", {}))
    params = dict(entry.params)
    if max_batch and "max_batch" in METHODS.config_class(entry.method).model_fields:
        params.setdefault("max_batch", max_batch)
    return create(entry.method, **params)


def batch_generator(seed: int, split: str, key: object, start: int) -> torch.Generator:
    """A random stream that depends only on what is computed and where, never on run order."""
    mix = zlib.crc32(f"{seed}|{split}|{key!r}|{start}".encode())
    return torch.Generator().manual_seed(mix)


def reference_images(dataset: Dataset, count: int, seed: int, device) -> torch.Tensor:
    """A seeded sample of training images in [0, 1]: the baselines of expected gradients."""
    train = dataset.train
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
    images = train.images[pick] if train.in_memory else torch.stack([train[int(i)][0] for i in pick])
    return images.to(device).float().div_(255)


def _batches(writer: StoreWriter, names: list[str], batch_size: int, n: int):
    """Grid batches [start, stop) with the methods that still have pending rows in them."""
    rows = writer.chunk_rows()
    step = max(rows, (batch_size // rows) * rows)
    pending = {name: writer.pending(name) for name in names}
    for start in range(0, n, step):
        stop = min(start + step, n)
        todo = [m for m in names if any(a < stop and b > start for a, b in pending[m])]
        if todo:
            yield start, stop, todo


def shard_rows(cfg: RunConfig, dataset: Dataset, split_name: str, shard: tuple[int, int]) -> tuple[int, int, int]:
    """(lo, hi, chunk rows) of shard ``(i, n)`` of a split: whole batches of the single-process grid."""
    split = dataset.split(split_name)
    row_bytes = 2 * int(np.prod(map_shape(split.geometry, cfg.attribution.reduction == "none")))
    return rows_of_shard(len(split), row_bytes, cfg.attribution.batch_size, shard, split_name)


def open_writer(
    cfg: RunConfig,
    dataset: Dataset,
    split_name: str,
    methods,
    entries,
    model_hash: str,
    patterns: str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> StoreWriter:
    """The store writer of a split (or of shard ``(i, n)`` of it): checks (and locks) an existing
    store against this run's inputs. ``patterns`` is the digest of the model's patterns, part of the
    identity of the maps that use them."""
    split = dataset.split(split_name)
    a = cfg.attribution
    identity = {"reduction": a.reduction, "target": a.target}
    path, n, chunk_rows = store_path(cfg, split_name), len(split), None
    if shard[1] > 1:
        lo, hi, chunk_rows = shard_rows(cfg, dataset, split_name, shard)
        identity[SHARD] = shard_identity(*shard, lo, hi, n)
        path, n = shard_path(path, *shard), hi - lo
    # max_batch only sets the memory budget, not the maps: it is not part of a method's identity.
    spec = {
        e.name: {"method": e.method, "params": methods[e.name].params.model_dump(mode="json", exclude={"max_batch"})}
        for e in entries
    }
    for e in entries:
        if "patterns" in methods[e.name].needs:
            spec[e.name]["patterns"] = patterns
    return StoreWriter(
        path,
        split=split_name,
        n=n,
        geometry=split.geometry,
        dataset=dataset.name,
        dataset_fingerprint=split.fingerprint(),
        model_hash=model_hash,
        channels=a.reduction == "none",
        methods=spec,
        identity=identity,
        rerun=RERUN,
        provenance={"seed": cfg.seed, "git_commit": git_commit(), "config": cfg.model_dump(mode="json")},
        compression=None if a.compression == "none" else a.compression,
        chunk_rows=chunk_rows,
    )


def extract_split(
    cfg: RunConfig,
    dataset: Dataset,
    split_name: str,
    model,
    methods: dict[str, Attribution],
    writer: StoreWriter,
    device,
    references,
    patterns=None,
) -> dict:
    split = dataset.split(split_name)
    a = cfg.attribution
    path = writer.path
    offset = writer.header["identity"].get(SHARD, {}).get("rows", [0])[0]  # a shard's first row in the split
    with writer:
        names = [name for name in writer.methods if name in methods]
        batches = _batches(writer, names, a.batch_size, writer.n)  # in the writer's rows: the shard's own
        work = [(offset + start, offset + stop, todo) for start, stop, todo in batches]
        total = sum(stop - start for start, stop, _ in work)
        bar = tqdm(total=total, desc=f"extract {split_name}", unit="img", disable=None, leave=False)
        for start, stop, todo in work:
            images_u8, labels = split.read(slice(start, stop), a.num_workers), split.labels[start:stop]
            images = images_u8.to(device).float().div_(255)
            labels = labels.to(device)
            predictions = predict(model, images, a.max_batch, a.amp)
            targets = predictions if a.target == "predicted" else labels
            indices = torch.arange(start, stop)
            masks = split.masks[start:stop].to(device) if split.masks is not None else None
            context = Context(indices=indices, masks=masks, references=references, patterns=patterns)
            shared: dict = {}
            maps = {}
            for name in todo:
                method = methods[name]
                key = method.shared_key()
                generator = batch_generator(cfg.seed, split_name, key if key is not None else name, start)
                if key is None:
                    raw = method(model, images, targets, generator=generator, context=context)
                else:
                    if key not in shared:
                        shared[key] = method.compute_shared(
                            model, images, targets, generator=generator, context=context
                        )
                    raw = method.from_shared(shared[key], images).float()
                maps[name] = reduce_map(raw, a.reduction, images.shape[1]).cpu().numpy()
            writer.write(start - offset, maps, labels.cpu(), predictions.cpu(), indices)
            bar.update(stop - start)
        bar.close()
        writer.finish()
    with MapStore.open(path, rerun=RERUN) as store:
        return {
            "split": split_name,
            "images": store.n,
            "methods": store.methods,
            "accuracy": float((store.predictions == store.labels).mean()),
            **({"rows": [offset, offset + store.n]} if offset or store.n < len(split) else {}),
        }


def _refuse_maps_of_other_patterns(cfg: RunConfig, dataset: Dataset, model, model_hash: str) -> None:
    """Refuse, before the patterns are estimated again, a store holding maps computed with the stored
    patterns when those no longer match their inputs: the new patterns would not fit those maps, and
    a refused run must leave the patterns file as it was."""
    why = stale_reason(cfg, dataset, model, model_hash)
    if not why:
        return
    for split in cfg.attribution.split_names():
        path = store_path(cfg, split)
        if not path.exists():
            continue
        with MapStore.open(path, require_complete=False, rerun=RERUN) as store:
            used = [m for m in store.methods if "patterns" in store.identity_of(m)]
        if used:
            raise RoarError(
                f"{path}: {', '.join(used)} computed with patterns that would now be estimated again ({why}); "
                "delete those maps (or the store) or keep the patterns' settings"
            )


def merge_shards(cfg: RunConfig, count: int, splits: list[str] | None = None, again: bool = True) -> list[Path]:
    """Stitch each split's ``count`` finished shards into ``<split>.h5`` (``roar.store.shards``); the
    stores merged here. ``again=False`` (a shard that finished last) leaves a store another shard merged."""
    merged = []
    for split in splits or cfg.attribution.split_names():
        path = merge_when_last(store_path(cfg, split), count, RERUN, again)
        merged += [path] if path is not None else []
    return merged


def run(cfg: RunConfig, shard: str | None = None) -> StageResult:
    """``roar extract`` for a run (or shard ``"i/n"`` of it): stores in ``<run>/attributions/<split>.h5``;
    returns a summary. A shard writes ``<split>.shard-<i>-of-<n>.h5``; the shard that finds every
    shard finished stitches them into ``<split>.h5`` (``roar merge`` does it by hand)."""
    t0 = time.perf_counter()
    index, count = parse_shard(shard)
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.dataset)
    trained, _, model_path = load_run_model(cfg, dataset, device)
    probe = dataset.test.read(slice(0, 16)).float().div_(255)
    model = prepare_model(trained, device, probe=probe)
    entries = cfg.attribution.entries()
    methods = {e.name: build_method(e, cfg.attribution.max_batch) for e in entries}
    # Each method declares what it needs from the context (``Attribution.needs``).
    masked = [
        e.name + ("" if e.name == e.method else f" ({e.method})") for e in entries if "masks" in methods[e.name].needs
    ]
    if masked and dataset.train.masks is None:
        verb = "needs" if len(masked) == 1 else "need"
        raise RoarError(f"method {', '.join(masked)} {verb} object masks, and dataset '{dataset.name}' has none")
    needs_refs = any("references" in method.needs for method in methods.values())
    references = reference_images(dataset, cfg.attribution.references, cfg.seed, device) if needs_refs else None
    model_hash = file_hash(model_path)
    # Patterns are estimated (or loaded) once per trained model, only when some method needs them.
    patterns, patterns_status = None, None
    if any("patterns" in method.needs for method in methods.values()):
        _refuse_maps_of_other_patterns(cfg, dataset, trained, model_hash)
        patterns, patterns_status = ensure_patterns(cfg, dataset, trained, model_hash, device)
    digest = None if patterns is None else patterns.digest
    inputs = {"dataset": dataset.fingerprint(), "model": model_hash, **({"patterns": digest} if digest else {})}
    out = cfg.run_dir / "attributions"
    splits = cfg.attribution.split_names()
    if count > 1:
        for split in splits:
            shard_rows(cfg, dataset, split, (index, count))  # too many shards: refused before anything is written
            if store_path(cfg, split).exists():
                raise RoarError(
                    f"{store_path(cfg, split)} exists: shards write a new store; delete it to extract in shards, "
                    "or extract in one process to add methods to it"
                )
    with output_folder(out, shared=count > 1), contextlib.ExitStack() as stores:
        # Every split's store is checked against this run before anything is written.
        writers = {
            split: stores.enter_context(
                open_writer(
                    cfg, dataset, split, methods, cfg.attribution.entries(split), model_hash, digest, (index, count)
                )
            )
            for split in splits
        }
        record_run(out, cfg, inputs, device)
        results = [
            extract_split(cfg, dataset, split, model, methods, writers[split], device, references, patterns)
            for split in splits
        ]
        merged = []
        last = count > 1 and all(p.exists() for split in splits for p in shard_paths(store_path(cfg, split), count))
        if last:
            merged = merge_shards(cfg, count, splits, again=False)
        summary = {
            "splits": results,
            "methods": [e.name for e in entries],
            "seconds": round(time.perf_counter() - t0, 2),
            "output": str(out),
        }
        if patterns is not None:
            summary["patterns"] = {"digest": digest, "status": patterns_status}
        if count > 1:
            summary["shard"] = {"index": index, "count": count, "merged": [str(p) for p in merged]}
        write_json(out / ("summary.json" if count == 1 else f"summary.shard-{index}-of-{count}.json"), summary)
    splits = ", ".join(
        f"{r['split']} ({r['images']}" + (f", rows {r['rows'][0]}-{r['rows'][1]}" if "rows" in r else "") + ")"
        for r in results
    )
    line = f"extracted {len(summary['methods'])} methods for {splits} in {summary['seconds']:.0f} s -> {out}"
    if count > 1:
        line += f" (shard {index} of {count}; " + ("shards merged)" if last else "waiting for the other shards)")
    if patterns is not None:
        line += f" (patterns {patterns_status})"
    return StageResult(summary, line)
