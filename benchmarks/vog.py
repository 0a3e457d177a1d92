"""Speed of VoG's gradient extraction and memory of VoG scoring, on the CPU, measured in one process.

    python -m benchmarks.vog [--quick] [--write docs/benchmarks.md]

1. **Gradient extraction.** ``roar.stages.vog.gradients.compute_split``, the whole path of ``roar vog``
   for one split: loading each snapshot, preparing it (BatchNorm folded, channels_last), one
   batched backward pass per chunk with the true-class logit, the channel mean, the peer arrays
   from the same logits, quantising and staging every chunk (fsynced), the peer cache, and the
   consolidation into the compressed HDF5 store. Against it, in the same rounds: one
   ``input_gradients`` call per snapshot over the same images, labels and chunk size, the
   snapshots already prepared and the images already float (the passes alone). Target: the path
   runs at ≥ 90 % of the reference's images/s. One more, untimed, run with the other compression
   (``lzf`` against the default ``none``) gives the store size it would save.
2. **VoG scoring memory.** ``vog_scores`` streaming over a store of N examples and over one of 4N
   (``open_gradients``: a lazy, dequantising [K, N, H, W] array), peak Python-heap memory by
   ``tracemalloc`` (numpy's buffers are traced), the same ``budget_bytes`` for both. Target: flat,
   peak(4N) ≤ 1.1 × peak(N). Its result is checked against the numpy formula on the whole
   dequantised array.

Weights and images are random (speed does not depend on them): a ResNet8 of the demo config's
widths, K snapshots with independently drawn weights, the last one equal to the final model (as
with ``training.snapshots.epochs: all``), 32×32 RGB images. Each side runs once to warm up, then
``rounds`` rounds in which path and reference alternate; the best round of each counts.
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import bench_parser, bench_run, header
from roar.attribution.engine import input_gradients, max_batch_for, prepare_model
from roar.config import load_config
from roar.core.provenance import file_hash
from roar.data import Dataset, TensorSplit
from roar.models import build_model
from roar.stages.train import model_metadata
from roar.stages.vog.gradients import (
    METHOD,
    REDUCTION,
    TARGET,
    PeerPlan,
    compute_split,
    find_snapshots,
    load_snapshot,
    open_gradients,
)
from roar.store import StoreWriter
from roar.training.checkpoint import save_atomic
from roar.vog.scores import vog_scores

SECTION = "## VoG"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
CLASSES, SIZE = 10, 32

# Targets: the extraction path's share of the passes' speed; peak(4N) ÷ peak(N) of VoG scoring.
SPEED_SHARE, MEMORY_RATIO = 0.90, 1.10


@dataclass(frozen=True)
class Settings:
    images: int  # images per extraction
    snapshots: int  # snapshots extracted
    rounds: int
    memory_n: int  # N of the memory measurement (and 4N)
    memory_k: int
    budget_mib: float  # vog_scores budget_bytes


PRESETS = {
    "quick": Settings(images=128, snapshots=2, rounds=1, memory_n=128, memory_k=3, budget_mib=0.25),
    # Short rounds, many of them: on a shared 2-core machine a round that another process interrupts can take
    # several times longer, and the best of many short rounds finds the quiet moments for both sides.
    "default": Settings(images=4096, snapshots=2, rounds=6, memory_n=2000, memory_k=10, budget_mib=16),
}


# ---------------------------------------------------------------------------------------------- setup


def fake_run(root: Path, cfg, dataset: Dataset, k: int) -> tuple[torch.nn.Module, Path]:
    """``root/train`` as ``roar train`` leaves it: ``model.pt`` and K snapshots (the last = the model)."""
    snapshots = root / "train" / "snapshots"
    model = None
    for i in range(k):
        torch.manual_seed(i)
        model = build_model(cfg.model, dataset.num_classes, dataset.test.geometry, dataset.mean, dataset.std)
        save_atomic(
            {"model": model.state_dict(), "epoch": i + 1, "step": 10 * (i + 1)}, snapshots / f"epoch_{i + 1:04d}.pt"
        )
    path = root / "train" / "model.pt"
    save_atomic({"state_dict": model.state_dict(), "meta": model_metadata(dataset, cfg), "summary": {}}, path)
    return model.eval(), path


def random_dataset(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    split = TensorSplit(images, labels)
    return Dataset("random", split, split, [f"class{i}" for i in range(CLASSES)], MEAN, STD)


# ---------------------------------------------------------------------------------------------- speed


def measure_speed(s: Settings, log) -> dict:
    device = torch.device("cpu")
    dataset = random_dataset(s.images)
    with tempfile.TemporaryDirectory(prefix="roar-bench-vog-") as tmp:
        tmp = Path(tmp)
        cfg = load_config(CONFIG, ["device=cpu", f"output_dir={tmp / 'run'}"])
        final, model_path = fake_run(tmp / "run", cfg, dataset, s.snapshots)
        snapshots = find_snapshots(tmp / "run" / "train" / "snapshots")
        model_hash = file_hash(*[x.path for x in snapshots], model_path)
        max_batch = max_batch_for(device, cfg.vog.max_batch)
        split = dataset.test
        images = split.images.float().div(255)
        probe = images[:16]
        prepared = [prepare_model(load_snapshot(final, x, model_path)[0], device, probe=probe) for x in snapshots]

        def path(r: int, compression: str) -> float:
            vog = cfg.vog.model_copy(update={"compression": compression})
            run_cfg = cfg.model_copy(update={"output_dir": tmp / f"out{r}-{compression}", "vog": vog})
            t0 = time.perf_counter()
            result = compute_split(
                run_cfg, dataset, "test", snapshots, final, model_path, model_hash, device, PeerPlan(True)
            )
            dt = time.perf_counter() - t0
            assert result["passes"] == len(snapshots)
            breakdown.append((dt, result["seconds"]))
            return dt

        def reference() -> float:
            t0 = time.perf_counter()
            for model in prepared:
                input_gradients(model, images, split.labels, max_batch=max_batch)
            return time.perf_counter() - t0

        breakdown: list[tuple[float, dict]] = []
        times: dict[str, list[float]] = {"path": [], "reference": []}
        for r in range(1 + s.rounds):
            order = ("path", "reference") if r % 2 else ("reference", "path")
            for name in order:
                dt = path(r, cfg.vog.compression) if name == "path" else reference()
                if r:  # round 0 is the warm-up
                    times[name].append(dt)
                log(f"{'warm-up' if not r else f'round {r}'} {name}: {dt:.2f} s")
        other = "lzf" if cfg.vog.compression == "none" else "none"
        path(1, other)  # untimed: the store size with the other compression, for comparison
        kinds = (cfg.vog.compression, other)
        size = {c: (tmp / f"out1-{c}" / "vog" / "gradients" / "test.h5").stat().st_size for c in kinds}
        timed = breakdown[1 : 1 + s.rounds]  # the rounds after the warm-up, without the untimed store
        info = {
            "times": times,
            "breakdown": min(timed, key=lambda item: item[0]),
            "n": s.images,
            "k": s.snapshots,
            "max_batch": max_batch,
            "batch_size": cfg.vog.batch_size,
            "compression": cfg.vog.compression,
            "other_compression": other,
            "store_mib": {c: v / 2**20 for c, v in size.items()},
            "widths": "/".join(map(str, cfg.model.widths)),
        }
    return info


# --------------------------------------------------------------------------------------------- memory


def write_random_store(path: Path, n: int, k: int, seed: int = 0) -> None:
    """A finished VoG gradient store of random maps: K snapshots of N examples, 32×32."""
    split = random_dataset(n, seed).test
    methods = {f"epoch_{i + 1:04d}": {"method": METHOD, "params": {"epoch": i + 1, "step": i + 1}} for i in range(k)}
    writer = StoreWriter(
        path,
        split="test",
        n=n,
        geometry=split.geometry,
        dataset="random",
        dataset_fingerprint=split.fingerprint(),
        model_hash="benchmark",
        identity={"reduction": REDUCTION, "target": TARGET},
        channels=False,
        methods=methods,
        provenance={"benchmark": "vog"},
    )
    rng = np.random.default_rng(seed)
    with writer:
        step = writer.chunk_rows()
        for start in range(0, n, step):
            stop = min(start + step, n)
            labels = split.labels[start:stop].numpy()
            maps = {m: rng.standard_normal((stop - start, SIZE, SIZE), dtype=np.float32) for m in methods}
            writer.write(start, maps, labels=labels, predictions=labels, indices=np.arange(start, stop))
        writer.finish()


def measure_memory(s: Settings, log) -> dict:
    budget = int(s.budget_mib * 2**20)
    out = {"budget": budget, "k": s.memory_k, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="roar-bench-vog-") as tmp:
        for n in (s.memory_n, 4 * s.memory_n):
            path = Path(tmp) / f"n{n}.h5"
            write_random_store(path, n, s.memory_k)
            with open_gradients(path) as g:
                vog_scores(g, budget_bytes=budget)  # warm-up: h5py and numpy allocate their caches once
                tracemalloc.start()
                t0 = time.perf_counter()
                scores = vog_scores(g, budget_bytes=budget)
                dt = time.perf_counter() - t0
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                check = None
                if n == s.memory_n:
                    full = np.asarray(g, dtype=np.float64)
                    expected = full.std(axis=0).reshape(n, -1).mean(axis=1)
                    check = float(np.abs(scores - expected).max() / np.abs(expected).max())
            out["sizes"][n] = {"peak": peak, "seconds": dt, "check": check, "full_mib": n * s.memory_k * SIZE**2 * 8}
            log(f"vog_scores N={n}: peak {peak / 2**20:.1f} MiB in {dt:.2f} s")
    return out


# --------------------------------------------------------------------------------------------- report


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(command: str, speed: dict, memory: dict, s: Settings, load_start: float, load_end: float) -> str:
    n, k = speed["n"], speed["k"]
    best = {name: min(values) for name, values in speed["times"].items()}
    rate = {name: n / (t / k) for name, t in best.items()}
    share = rate["path"] / rate["reference"]
    small, large = (memory["sizes"][m] for m in sorted(memory["sizes"]))
    ratio = large["peak"] / small["peak"]
    rows = sorted(memory["sizes"].items())
    mib = speed["store_mib"]
    labels = {
        "reference": f"`input_gradients` alone, {k} prepared snapshots (reference)",
        "path": f"`compute_split`: the whole path incl. store writes (`vog.compression: {speed['compression']}`)",
    }
    lines = [
        *header(SECTION, command, load_start, load_end),
        f"- Settings: ResNet8 {speed['widths']} with random weights, {k} snapshots (the last equal to the final "
        f"model), {n} random 32×32 images; batches of {speed['batch_size']} images, chunks of {speed['max_batch']} "
        f"inputs per pass on both sides; peers on, GraNd off. Best of {s.rounds} rounds after a warm-up, path and "
        f"reference alternating. Scoring: K = {memory['k']} snapshots, budget_bytes {memory['budget'] / 2**20:g} "
        "MiB.",
        f"- Check: VoG from the store over the HDF5 reader vs the numpy formula on the dequantised array, "
        f"max relative difference {small['check']:.1e}.",
        f"- Store size: {mib[speed['compression']]:.2f} MiB with `vog.compression: {speed['compression']}`, "
        f"{mib[speed['other_compression']]:.2f} MiB with `{speed['other_compression']}` (written once, untimed).",
        "",
        "| Gradient extraction | Time (best) | Images/s per snapshot | Share of the reference | Target | Met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, label in labels.items():
        target = f"≥ {100 * SPEED_SHARE:.0f}%" if name == "path" else "—"
        met = _yes(share >= SPEED_SHARE) if name == "path" else "—"
        lines.append(
            f"| {label} | {best[name]:.2f} s | {rate[name]:.0f} | {100 * rate[name] / rate['reference']:.0f}% | "
            f"{target} | {met} |"
        )
    total, parts = speed["breakdown"]
    named = {"passes": "passes", "writes": "chunk writes", "consolidation": "consolidation", "models": "models"}
    lines += [
        "",
        f"Where the path's time goes (its best round, {total:.2f} s): "
        + ", ".join(f"{named.get(key, key)} {value:.2f} s" for key, value in parts.items())
        + ". Passes: the gradient passes with the peer scores from their logits; chunk writes: quantising and "
        "staging every chunk of maps and peer scores (fsynced); consolidation: copying the staged chunks into the "
        "compressed HDF5 file; models: loading each snapshot and folding its BatchNorm.",
        "",
        "| VoG scoring | Examples | Gradients in float64 | Peak traced memory | Time |",
        "|---|---:|---:|---:|---:|",
    ]
    for n_rows, m in rows:
        lines.append(
            f"| `vog_scores` over the store | {n_rows} | {m['full_mib'] / 2**20:.0f} MiB | {m['peak'] / 2**20:.1f} MiB "
            f"| {m['seconds']:.2f} s |"
        )
    lines += [
        "",
        "Targets:",
        "",
        f"- Extraction ≥ {100 * SPEED_SHARE:.0f}% of the passes' speed: {'met' if share >= SPEED_SHARE else 'not met'} "
        f"({100 * share:.0f}%).",
        f"- Scoring memory flat, peak(4N) ≤ {MEMORY_RATIO:.2f} × peak(N): "
        f"{'met' if ratio <= MEMORY_RATIO else 'not met'} ({ratio:.2f}×).",
    ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = bench_parser("benchmarks.vog", __doc__, "smoke test: a few hundred images (≈ 15 s)").parse_args(argv)
    s = PRESETS["quick" if args.quick else "default"]
    return bench_run(
        "benchmarks.vog",
        argv,
        args.write,
        lambda log: (measure_speed(s, log), measure_memory(s, log)),
        lambda c, r, a, b: render(c, *r, s, a, b),
    )


if __name__ == "__main__":
    raise SystemExit(main())
