"""Speed of ROAR/KAR retraining data on the CPU: one training epoch on ablated images against one on the originals.

    python -m benchmarks.retrain [--quick] [--write docs/benchmarks.md]

One training epoch (``train_one_epoch``: batches, augmentation, forward, backward and optimiser
step) with the demo config's retraining recipe (``roar.training``: ResNet8 16/32/64 and the fast
recipe) on the built-in shapes training split, three ways:

(a) ``InMemorySource`` on the unmodified images: the reference;
(b) ``ablated_source(..., streaming=False)``: ROAR at 50 %, mean fill, pixel granularity, removal
    masks built once when the source is made (that one-off setup is timed separately);
(c) ``ablated_source(..., streaming=True, num_workers=2)``: the same ablation, maps read from the
    store by loader workers and ranked batch by batch in the main process.

The maps come from an attribution store written with ``StoreWriter`` in a temporary directory for
this split (its fingerprint, geometry and size), filled with random maps: the cost of ranking and
ablating does not depend on the values. Each epoch starts from the same initial weights with a
fresh optimiser and schedule and the same epoch generator. One warm-up epoch per path, then rounds
in which the three paths alternate (in a rotating order, so that a change in machine load hits all
alike); the best round counts. Each round also times the batches alone (the source iterated
without training) to show where any overhead comes from.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import bench_parser, bench_run, header
from roar.config import load_config
from roar.core.device import memory_format
from roar.data import TensorSplit, build_dataset
from roar.models import build_model
from roar.perturb.fills import build_fill
from roar.stages.retrain.data import ablated_source
from roar.stages.retrain.sweep import retraining_recipe
from roar.store import StoreWriter
from roar.training.sources import InMemorySource
from roar.training.trainer import epoch_generator, make_optimizer, make_scheduler, train_one_epoch

SECTION = "## ROAR/KAR retraining data"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
METHOD, FRACTION, MODE, FILL, GRANULARITY, WORKERS = "random", 0.5, "roar", "mean", "pixel", 2

# Targets: epoch time relative to the unmodified in-memory epoch.
IN_MEMORY_RATIO, STREAMING_RATIO = 1.10, 1.5


@dataclass(frozen=True)
class Settings:
    images: int  # training images (the first ones of the demo's training split)
    rounds: int


PRESETS = {"quick": Settings(512, rounds=1), "default": Settings(8000, rounds=3)}
PATHS = {
    "reference": "(a) unmodified, in memory (`InMemorySource`)",
    "in_memory": "(b) ablated, in memory",
    "streaming": f"(c) ablated, streaming ({WORKERS} workers)",
}


# ---------------------------------------------------------------------------------------------- setup


def write_store(path: Path, split, dataset_name: str, cfg, seed: int = 0) -> None:
    """A complete store of random maps for ``split``, written chunk by chunk as the extraction stage does."""
    _, h, w = split.geometry
    writer = StoreWriter(
        path,
        split="train",
        n=len(split),
        geometry=split.geometry,
        dataset=dataset_name,
        dataset_fingerprint=split.fingerprint(),
        model_hash="benchmark",
        identity={"reduction": cfg.attribution.reduction, "target": cfg.attribution.target},
        channels=False,
        methods={METHOD: {"method": "random", "params": {}}},
        provenance={"benchmark": "retrain"},
        compression=None if cfg.attribution.compression == "none" else cfg.attribution.compression,
    )
    g = torch.Generator().manual_seed(seed)
    with writer:
        step = writer.chunk_rows()
        for start in range(0, len(split), step):
            stop = min(start + step, len(split))
            labels = split.labels[start:stop].numpy()
            maps = torch.rand(stop - start, h, w, generator=g).numpy()
            writer.write(start, {METHOD: maps}, labels=labels, predictions=labels, indices=np.arange(start, stop))
        writer.finish()


class Trainer:
    """One epoch of ``train_one_epoch`` from the same initial weights, optimiser state and generator."""

    def __init__(self, cfg, dataset, device):
        self.training, self.seed, self.device = cfg.training, cfg.seed, device
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, dataset.num_classes, dataset.train.geometry, dataset.mean, dataset.std)
        self.model.to(device=device, memory_format=memory_format(device, cfg.training.channels_last))
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}

    def epoch(self, source) -> dict:
        self.model.load_state_dict(self.initial)
        optimizer = make_optimizer(self.model, self.training)
        scheduler = make_scheduler(optimizer, self.training, max(len(source) // self.training.batch_size, 1))
        metrics, _ = train_one_epoch(
            self.model, source, optimizer, scheduler, self.training, epoch_generator(self.seed, 1), self.device, 0
        )
        return metrics

    def data_only(self, source) -> int:
        """The batches of one epoch without training: what the source itself costs."""
        n = 0
        for images, _, _ in source.batches(self.training.batch_size, epoch_generator(self.seed, 1), drop_last=True):
            n += len(images)
        return n


def check_paths_agree(in_memory, streaming, batch_size: int) -> tuple[int, bool]:
    """(images compared, all equal): the streaming batches against the in-memory images of the same rows."""
    compared, equal = 0, True
    for i, (images, _, idx) in enumerate(streaming.batches(batch_size, torch.Generator().manual_seed(1))):
        equal &= torch.equal(images, in_memory.images_for(idx))
        compared += len(idx)
        if i == 1:
            break
    return compared, equal


# ---------------------------------------------------------------------------------------------- runs


def measure(s: Settings, log) -> dict:
    cfg = load_config(CONFIG, ["device=cpu"])
    cfg = cfg.model_copy(update={"training": retraining_recipe(cfg)})  # the recipe a retraining run uses
    device = torch.device("cpu")
    t0 = time.perf_counter()
    dataset = build_dataset(cfg.dataset)
    train = dataset.train
    if s.images < len(train):
        train = TensorSplit(train.images[: s.images], train.labels[: s.images])
    log(f"dataset: {len(train)} training images {tuple(train.geometry)} ({time.perf_counter() - t0:.1f} s)")
    fill = build_fill(FILL, mean=dataset.mean)
    trainer = Trainer(cfg, dataset, device)
    info: dict = {"cfg": cfg, "n": len(train), "geometry": train.geometry, "workers": WORKERS}

    with tempfile.TemporaryDirectory(prefix="roar-bench-") as tmp:
        store = Path(tmp) / "train.h5"
        t0 = time.perf_counter()
        write_store(store, train, dataset.name, cfg)
        info["store_seconds"] = time.perf_counter() - t0
        info["store_mib"] = store.stat().st_size / 2**20
        log(f"store: {info['store_mib']:.1f} MiB of random maps ({info['store_seconds']:.1f} s)")

        def make(streaming: bool):
            return ablated_source(
                train,
                store,
                METHOD,
                FRACTION,
                MODE,
                fill,
                seed=cfg.seed,
                granularity=GRANULARITY,
                device=device,
                streaming=streaming,
                num_workers=WORKERS,
                dataset_name=dataset.name,
                split_name="train",
            )

        setups: dict[str, list[float]] = {"in_memory": [], "streaming": []}
        sources = {"reference": InMemorySource(train.images, train.labels, device)}
        for _ in range(1 + s.rounds):  # the first construction also warms up (imports, h5py, allocator)
            for name, streaming in (("in_memory", False), ("streaming", True)):
                t0 = time.perf_counter()
                sources[name] = make(streaming)
                setups[name].append(time.perf_counter() - t0)
        info["setup"] = {k: min(v[1:]) for k, v in setups.items()}
        log(
            f"setup: in memory {info['setup']['in_memory']:.2f} s (masks of {len(train)} images), "
            f"streaming {info['setup']['streaming']:.3f} s"
        )
        info["check"] = check_paths_agree(sources["in_memory"], sources["streaming"], cfg.training.batch_size)

        epochs: dict[str, list[float]] = {k: [] for k in sources}
        data: dict[str, list[float]] = {k: [] for k in sources}
        names = list(sources)
        for r in range(1 + s.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                trainer.data_only(sources[name])
                dt_data = time.perf_counter() - t0
                t0 = time.perf_counter()
                metrics = trainer.epoch(sources[name])
                dt = time.perf_counter() - t0
                if r:  # round 0 is the warm-up
                    epochs[name].append(dt)
                    data[name].append(dt_data)
                log(
                    f"{'warm-up' if not r else f'round {r}'} {name}: epoch {dt:.2f} s, batches alone {dt_data:.2f} s, "
                    f"loss {metrics['train_loss']:.3f}"
                )
        info["epochs"], info["data"] = epochs, data
    return info


# ---------------------------------------------------------------------------------------------- report


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(info: dict) -> str:
    ref = min(info["epochs"]["reference"])
    targets = {"in_memory": IN_MEMORY_RATIO, "streaming": STREAMING_RATIO}
    lines = [
        "| Data | Epoch (best) | Epoch (median) | ÷ (a) | Batches alone (best) | Images/s | Target | Met |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, label in PATHS.items():
        best, median = min(info["epochs"][name]), statistics.median(info["epochs"][name])
        target = targets.get(name)
        lines.append(
            f"| {label} | {best:.2f} s | {median:.2f} s | {best / ref:.2f}× | {min(info['data'][name]):.2f} s | "
            f"{info['n'] / best:.0f} | {f'≤ {target:.2f}× (a)' if target else '—'} | "
            f"{_yes(best / ref <= target) if target else '—'} |"
        )
    return "\n".join(lines)


def targets_text(info: dict) -> str:
    ref = min(info["epochs"]["reference"])
    b, c = min(info["epochs"]["in_memory"]) / ref, min(info["epochs"]["streaming"]) / ref
    return "\n".join(
        [
            f"- In-memory ablated epoch ≤ {IN_MEMORY_RATIO:.2f}× the unmodified epoch: "
            f"{'met' if b <= IN_MEMORY_RATIO else 'not met'} ({b:.2f}×).",
            f"- Streaming epoch ≤ {STREAMING_RATIO:.2f}× the unmodified epoch: "
            f"{'met' if c <= STREAMING_RATIO else 'not met'} ({c:.2f}×).",
        ]
    )


def settings_text(info: dict, s: Settings) -> str:
    cfg = info["cfg"]
    t, m = cfg.training, cfg.model
    c, h, w = info["geometry"]
    widths = "/".join(map(str, getattr(m, "widths", ()))) or "default"
    o = t.optimizer
    return (
        f"the first {info['n']} images ({c}×{h}×{w}) of the demo's shapes training split; "
        f"{m.name} {widths}, batch {t.batch_size}, drop last, {o.name} lr {o.lr:g}, {t.schedule.name} schedule "
        f"over {t.epochs} epochs, random crop (padding {t.augment.crop_padding}) and flip "
        f"{'on' if t.augment.flip else 'off'}, channels_last {'on' if t.channels_last else 'off'}, float32; "
        f"ablation {MODE.upper()} at {FRACTION:.0%}, {FILL} fill, {GRANULARITY} granularity, maps from a store of "
        f"random maps ({info['store_mib']:.1f} MiB, {cfg.attribution.compression}); streaming with "
        f"{info['workers']} loader workers. Best of {s.rounds} rounds after a warm-up, the three paths alternating "
        "in a rotating order within each round; every epoch from the same initial weights, a fresh optimiser and "
        "schedule and the same epoch generator."
    )


def render(command: str, info: dict, s: Settings, load_start: float, load_end: float) -> str:
    compared, equal = info["check"]
    setup = info["setup"]
    parts = [
        *header(SECTION, command, load_start, load_end),
        f"- Settings: {settings_text(info, s)}",
        f"- Check: streaming and in-memory ablated images of the same rows bit-identical: "
        f"{'yes' if equal else '**no**'} ({compared} images compared).",
        "",
        table(info),
        "",
        f"One-off setup, not in the epochs above: (b) builds the removal masks of all {info['n']} images when the "
        f"source is made, {setup['in_memory']:.2f} s (≈ {setup['in_memory'] / min(info['epochs']['reference']):.2f} "
        f"unmodified epochs); (c) only checks the store against the split, {setup['streaming']:.3f} s. "
        '"Batches alone": the source iterated for one epoch without training.',
        "",
        "Targets:",
        "",
        targets_text(info),
    ]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    quick = f"smoke test: {PRESETS['quick'].images} images, one round"
    args = bench_parser("benchmarks.retrain", __doc__, quick).parse_args(argv)
    s = PRESETS["quick" if args.quick else "default"]
    return bench_run(
        "benchmarks.retrain", argv, args.write, lambda log: measure(s, log), lambda c, r, a, b: render(c, r, s, a, b)
    )


if __name__ == "__main__":
    raise SystemExit(main())
