"""Scaling of sharded extraction: two shard processes against one, and the arithmetic for a cluster.

    python -m benchmarks.scaling [--quick] [--write docs/benchmarks.md]

A run's model (ResNet8 16/32/64, as built: the weights do not change the speed) and Integrated
Gradients over the train split of the built-in dataset, extracted by ``roar extract`` in
processes started as a user starts them:

(a) one process, one thread: one device's rate (here, a core's);
(b) two shard processes at once (``--shard 0/2`` and ``1/2``), one thread each: two devices, the
    last shard merging both into one store (HDF5 virtual datasets);
(c) one process with every core: what one process gets from this machine.

Throughput counts gradient passes (IG with S steps: S per image) over the stage's own seconds, so
Python's start-up is left out; the wall time of (b) includes it and the merge. The check: the
merged store's digests equal those of (a), bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import bench_parser, bench_run, header

SECTION = "## Sharded extraction: scaling"
REPO = Path(__file__).resolve().parents[1]
IMAGENET = 1_281_167  # ImageNet-1k training images
IG_STEPS_PAPER = 50


@dataclass(frozen=True)
class Settings:
    images: int
    steps: int


PRESETS = {"quick": Settings(512, 2), "default": Settings(2048, 8)}


def _sets(root: Path, s: Settings) -> list[str]:
    return [
        f"output_dir={root / 'run'}",
        f"dataset.root={root / 'data'}",
        f"dataset.train_size={s.images}",
        "dataset.test_size=64",
        "model.widths=[16,32,64]",
        "training.epochs=0",
        f"attribution.methods=[{{name: integrated_gradients, steps: {s.steps}}}]",
        "attribution.splits=[train]",
        "attribution.batch_size=64",
    ]


def _roar(args: list[str], sets: list[str], threads: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "roar", *args, "--config", "configs/smoke.yaml"]
    command += [x for s in sets for x in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MPLBACKEND": "Agg"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")


def _extract(root: Path, s: Settings, shards: int, threads: int) -> dict:
    """One extraction from scratch: wall seconds and each process's stage seconds."""
    store = root / "run" / "attributions"
    shutil.rmtree(store, ignore_errors=True)
    sets = _sets(root, s)
    t0 = time.perf_counter()
    if shards == 1:
        _finish([_roar(["extract"], sets, threads)])
        stage = [json.loads((store / "summary.json").read_text())["seconds"]]
    else:
        _finish([_roar(["extract", "--shard", f"{i}/{shards}"], sets, threads) for i in range(shards)])
        stage = [
            json.loads((store / f"summary.shard-{i}-of-{shards}.json").read_text())["seconds"] for i in range(shards)
        ]
    wall = time.perf_counter() - t0
    return {"wall": wall, "stage": max(stage), "digest": _digests(store / "train.h5")}


def _digests(path: Path) -> dict:
    from roar.store import MapStore

    with MapStore.open(path) as store:
        return {m: store.digest(m) for m in store.methods}


def _merge_seconds(root: Path, s: Settings) -> float:
    """``roar merge`` alone on the two finished shards (the merged file removed first)."""
    (root / "run" / "attributions" / "train.h5").unlink()
    t0 = time.perf_counter()
    _finish([_roar(["merge", "--shards", "2"], _sets(root, s), 1)])
    return time.perf_counter() - t0


def measure(s: Settings, log) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="roar-bench-scaling-") as tmp:
        root = Path(tmp)
        log("training (0 epochs: the model as built)")
        _finish([_roar(["train"], _sets(root, s), cores)])
        log(f"(c) one process, {cores} threads")
        full = _extract(root, s, 1, cores)
        log("(a) one process, one thread")
        one = _extract(root, s, 1, 1)
        log("(b) two shard processes, one thread each")
        two = _extract(root, s, 2, 1)
        log("merge alone")
        merge = _merge_seconds(root, s)
    passes = s.images * s.steps
    return {"one": one, "two": two, "full": full, "merge": merge, "passes": passes, "cores": cores}


def render(command: str, info: dict, s: Settings, load_start: float, load_end: float) -> str:
    one, two, full, passes = info["one"], info["two"], info["full"], info["passes"]
    rate = passes / one["stage"]
    speedup = one["wall"] / two["wall"]
    stage_speedup = one["stage"] / two["stage"]
    same = one["digest"] == two["digest"] == full["digest"]
    rows = [
        "| run | processes × threads | wall s | stage s | passes/s | speed-up (wall) |",
        "|---|---|---|---|---|---|",
        f"| (a) one process | 1 × 1 | {one['wall']:.1f} | {one['stage']:.1f} | {passes / one['stage']:.0f} | 1.00× |",
        f"| (b) two shards, merged | 2 × 1 | {two['wall']:.1f} | {two['stage']:.1f} | {passes / two['stage']:.0f} "
        f"| **{speedup:.2f}×** |",
        f"| (c) one process | 1 × {info['cores']} | {full['wall']:.1f} | {full['stage']:.1f} | "
        f"{passes / full['stage']:.0f} | {one['wall'] / full['wall']:.2f}× |",
    ]
    hours = IMAGENET * IG_STEPS_PAPER / rate / 3600
    parts = [
        *header(SECTION, command, load_start, load_end),
        f"- Settings: IG with {s.steps} steps over {s.images} training images of the built-in dataset "
        f"(32×32), ResNet8 16/32/64, batches of 64: {passes} gradient passes per run.",
        f"- Check: the store merged from the two shards equals the one-process stores bit for bit (digests of "
        f"every method): {'yes' if same else '**no**'}.",
        "",
        *rows,
        "",
        f"Two shards on two cores take the work of one in {1 / speedup:.2f} of its wall time "
        f"({stage_speedup:.2f}× on the stage's own seconds, {100 * stage_speedup / 2:.0f}% of linear); the rest "
        f"is each process's start-up and the merge, {info['merge']:.1f} s for `roar merge` alone, Python "
        "start-up included (a pass over the "
        "maps for their digest; the maps themselves are not copied). Shards share nothing while they run, so "
        "on separate devices the speed-up is the number of devices, less start-up and merge.",
        "",
        "Projection (the arithmetic, not a measurement): time = passes per image × images ÷ (passes/s per "
        "device × devices). IG-50 over ImageNet's 1,281,167 training images is 50 × 1,281,167 ≈ 64.1 M passes; "
        f"at this core's {rate:.0f} passes/s (a 32×32 ResNet8) that is {hours:,.0f} core-hours. For ResNet-50 at "
        "224×224 put in your GPU's rate, from the `seconds` of a `roar extract` over a few thousand images: at "
        "R passes/s per GPU, 64.1 M ÷ (R × G) s on G GPUs; e.g. R = 1,000 gives 17.8 h on one GPU and "
        "2.2 h on 8 (one shard per GPU, `task extract-attribution-maps NPROC=8` or a Slurm array of 8).",
    ]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    quick = f"smoke test: {PRESETS['quick'].images} images, IG-{PRESETS['quick'].steps}"
    args = bench_parser("benchmarks.scaling", __doc__, quick).parse_args(argv)
    s = PRESETS["quick" if args.quick else "default"]
    return bench_run(
        "benchmarks.scaling", argv, args.write, lambda log: measure(s, log), lambda c, r, a, b: render(c, r, s, a, b)
    )


if __name__ == "__main__":
    raise SystemExit(main())
