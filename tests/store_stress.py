"""SIGKILL stress test of the array store.

A writer process builds a store in two stages (two methods, then a third added to the finished
store) and is killed with SIGKILL, then resumed. After every kill the store must be refused as
unfinished, or be complete and equal to an uninterrupted run, and never be damaged; a resumed writer
must have exactly the rows that were not finished before the kill left to compute; the final file
must be bit-identical to that of an uninterrupted run.

Two ways to choose the moment of a kill:

* ``time``: the harness kills the writer after a random delay, so kills land anywhere, including
  inside HDF5 and numpy calls;
* ``event``: the writer kills itself just before its k-th file operation (fsync, rename, unlink,
  HDF5 dataset creation, write, copy, attribute or close), which reaches every step deterministically.

    python tests/store_stress.py --trials 30 --seed 0     # random kill times
    python tests/store_stress.py --sweep                  # a kill before every file operation

``tests/test_store.py`` runs a short deterministic version.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

CONTEXT = multiprocessing.get_context("forkserver")
N = 320
GEOMETRY = (3, 64, 64)  # 8 KiB per float16 row -> 64 rows per chunk -> 5 chunks
STAGES = (("a", "b"), ("a", "b", "c"))  # the second stage adds a method to the finished store
METHODS = {
    "a": {"method": "gradient", "params": {}},
    "b": {"method": "smoothgrad_sq", "params": {"n": 25, "sigma": 0.15}},
    "c": {"method": "integrated_gradients", "params": {"steps": 50}},
}


def maps_for(method: str, start: int, stop: int) -> np.ndarray:
    """Deterministic maps for rows [start, stop): magnitudes from 1e-24 to 1e3, some all-zero images."""
    rng = np.random.default_rng([ord(method), start])
    k = stop - start
    maps = rng.standard_normal((k, *GEOMETRY[1:])).astype(np.float32)
    maps *= (10.0 ** rng.uniform(-24, 3, size=k)).astype(np.float32)[:, None, None]
    maps[rng.random(k) < 0.1] = 0
    return maps


def writer_kwargs(methods: tuple[str, ...], n: int) -> dict:
    return {
        "split": "train",
        "n": n,
        "geometry": GEOMETRY,
        "dataset": "stress",
        "dataset_fingerprint": "f" * 64,
        "model_hash": "m" * 64,
        "identity": {"reduction": "sum_squares", "target": "predicted"},
        "rerun": "roar extract",
        "channels": False,
        "methods": {name: METHODS[name] for name in methods},
        "provenance": {"roar_version": "test", "git_commit": "stress"},
    }


# ------------------------------------------------------------------------------------------- the writer


def install_kill_point(kill_at: int | None):
    """Count file operations; SIGKILL this process just before operation number ``kill_at``."""
    counter = itertools.count(1)
    operations = [(os, "replace"), (os, "fsync"), (os, "unlink"), (shutil, "rmtree")]
    operations += [(h5py.Group, name) for name in ("create_dataset", "create_group", "copy")]
    operations += [(h5py.Dataset, "__setitem__"), (h5py.AttributeManager, "__setitem__"), (h5py.File, "close")]

    def hook(original):
        def hooked(*args, **kwargs):
            if next(counter) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        return hooked

    for owner, name in operations:
        setattr(owner, name, hook(getattr(owner, name)))
    return counter


def child(path: str, methods: tuple[str, ...], n: int, report, kill_at: int | None = None) -> None:
    """Write (or resume) a store; reports the rows pending per method, then the number of file operations."""
    from roar.store import StoreWriter

    counter = install_kill_point(kill_at)
    writer = StoreWriter(path, **writer_kwargs(methods, n))
    pending = {name: writer.pending(name) for name in methods}
    report({name: sum(b - a for a, b in ranges) for name, ranges in pending.items()})
    step = writer.chunk_rows()
    for start in range(0, n, step):
        stop = min(start + step, n)
        todo = [name for name in methods if any(a <= start < b for a, b in pending[name])]
        if todo:
            rows = np.arange(start, stop)
            maps = {name: maps_for(name, start, stop) for name in todo}
            writer.write(start, maps, labels=rows % 10, predictions=(rows * 7) % 10, indices=rows)
    writer.finish()
    report({"finished": next(counter) - 1})


def _child_main(conn, path: str, methods: tuple[str, ...], n: int, kill_at: int | None) -> None:
    try:
        child(path, methods, n, conn.send, kill_at)
    except BaseException:
        conn.send({"error": traceback.format_exc()})
        raise


def preload() -> None:
    """Writers fork from a server that has already imported everything they need."""
    CONTEXT.set_forkserver_preload(["__main__", "numpy", "h5py", "roar.store"])


def spawn(path: Path, methods: tuple[str, ...], n: int, kill_at: int | None = None):
    receiver, sender = CONTEXT.Pipe(duplex=False)
    proc = CONTEXT.Process(target=_child_main, args=(sender, str(path), methods, n, kill_at), daemon=True)
    proc.start()
    sender.close()
    return proc, receiver


def _messages(receiver, timeout: float) -> list:
    """Everything the writer sent until it closed its end of the pipe."""
    out, deadline = [], time.monotonic() + timeout
    while receiver.poll(max(0.0, deadline - time.monotonic())):
        try:
            out.append(receiver.recv())
        except EOFError:
            return out
    raise AssertionError(f"writer still running after {timeout} s")


def _errors(messages: list) -> None:
    for message in messages:
        if "error" in message:
            raise AssertionError(f"writer failed:\n{message['error']}")


def run_to_end(path: Path, methods: tuple[str, ...], n: int) -> tuple[dict, float, int]:
    """An uninterrupted writer: its pending rows, seconds after reporting them, and file operations."""
    proc, receiver = spawn(path, methods, n)
    assert receiver.poll(120), "writer sent nothing within 120 s"
    pending = receiver.recv()
    began = time.perf_counter()
    messages = _messages(receiver, 120)
    took = time.perf_counter() - began
    proc.join(60)
    _errors([pending, *messages])
    assert proc.exitcode == 0 and messages and "finished" in messages[-1], f"writer exit status {proc.exitcode}"
    return pending, took, messages[-1]["finished"]


def run_and_kill(path: Path, methods: tuple[str, ...], n: int, kill: tuple[str, float]) -> tuple[dict | None, bool]:
    """A writer killed by ``("time", seconds after it reported its pending rows)`` or ``("event", k)``.

    Returns its pending rows (None if it died before reporting them) and whether it had finished.
    """
    how, when = kill
    proc, receiver = spawn(path, methods, n, kill_at=int(when) if how == "event" else None)
    if how == "time":
        assert receiver.poll(120), "writer sent nothing within 120 s"
        messages = [receiver.recv()]
        time.sleep(when)
        proc.kill()  # SIGKILL
    messages = (messages if how == "time" else []) + _messages(receiver, 120)
    proc.join(60)
    _errors(messages)
    assert proc.exitcode in (0, -signal.SIGKILL), f"writer exit status {proc.exitcode}"
    pending = next((m for m in messages if "finished" not in m), None)
    return pending, any("finished" in m for m in messages)


# ---------------------------------------------------------------------------------------------- checks


def raw(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a consolidated store, as stored (float16 maps compared bit for bit)."""
    with h5py.File(path, "r") as f:
        out = {key: f[key][:] for key in ("labels", "predictions", "indices")}
        for name in f["maps"]:
            out[f"maps/{name}"] = f["maps"][name][:].view(np.uint16)
            out[f"scales/{name}"] = f["scales"][name][:].view(np.uint32)
    return out


def check_state(path: Path, methods: tuple[str, ...], n: int, reference: dict, previous: dict) -> dict:
    """What a kill left: refused as unfinished, or complete and equal to the reference; never damaged.

    Returns rows done per method, which must never decrease. Every row reported done must hold
    exactly the reference maps. A complete store may lack a method that is about to be added.
    """
    from roar.core.errors import RoarError
    from roar.store import MapStore

    try:
        with MapStore.open(path) as store:
            present = list(store.methods)
        for key, value in raw(path).items():
            assert key in reference and np.array_equal(value, reference[key]), f"complete store: {key} differs"
        done = {name: n if name in present else 0 for name in methods}
    except RoarError as exc:
        message = str(exc)
        if "unfinished" not in message and "no store" not in message:
            raise AssertionError(f"store left damaged: {message}") from None
        done = {name: 0 for name in methods} if "no store" in message else _partial(path, methods, reference)
    for name, rows in done.items():
        assert rows >= previous.get(name, 0), f"{name}: rows done went back from {previous.get(name)} to {rows}"
    return done


def _partial(path: Path, methods: tuple[str, ...], reference: dict) -> dict:
    """Rows done per method of an unfinished store, after checking every finished chunk."""
    from roar.store import MapStore, dequantize

    with MapStore.open(path, require_complete=False) as store:
        for name in store.methods:
            for start, maps in store.read_chunks(name):
                q = reference[f"maps/{name}"][start : start + len(maps)].view(np.float16)
                expected = dequantize(q, reference[f"scales/{name}"][start : start + len(maps)].view(np.float32))
                assert np.array_equal(maps, expected), f"{name} rows from {start} differ from the reference"
        return {name: store.method_info(name)["rows_done"] if name in store.methods else 0 for name in methods}


def _check_pending(pending: dict, done: dict, n: int) -> None:
    """A resumed writer computes exactly the rows that were not finished (nothing twice)."""
    for name, rows in pending.items():
        assert rows == n - done.get(name, 0), f"{name}: resumed with {rows} rows pending, {done.get(name, 0)} were done"


def _phase(path: Path) -> str:
    """Which step of the writer a kill interrupted, judged by the files it left."""
    staging = path.with_name(path.name + ".staging")
    if list(path.parent.glob(f".{path.name}.*.tmp")):
        return "consolidating"
    if staging.exists() and path.exists():
        try:
            from roar.store import MapStore

            with MapStore.open(path, require_complete=False) as store:
                return "adding a method" if not store.complete else "cleaning up after consolidation"
        except Exception as exc:
            return f"damaged: {exc}"
    if staging.exists():
        return "staging chunks"
    return "finished" if path.exists() else "starting"


# ------------------------------------------------------------------------------------------------ trials


@dataclass
class Stats:
    trials: int = 0
    kills: int = 0
    killed_after_finishing: int = 0
    unfinished_after_kill: int = 0
    complete_after_kill: int = 0
    resumes: int = 0
    identical: int = 0
    phases: dict[str, int] = field(default_factory=dict)  # where the kills landed
    failures: list[str] = field(default_factory=list)


@dataclass
class Reference:
    stores: dict[tuple, dict]  # the uninterrupted store after each stage
    seconds: list[float]  # how long each stage's writer ran after reporting its pending rows
    operations: list[int]  # how many file operations each stage's writer made


def make_reference(folder: Path, n: int) -> Reference:
    path = folder / "reference" / "train.h5"
    ref = Reference({}, [], [])
    for methods in STAGES:
        _, took, operations = run_to_end(path, methods, n)
        ref.stores[methods] = raw(path)
        ref.seconds.append(took)
        ref.operations.append(operations)
    return ref


def trial(folder: Path, n: int, ref: Reference, kills: list[list[tuple[str, float]]], stats: Stats) -> None:
    """One store built through every stage, killed as given in each stage, then resumed to the end."""
    path = folder / "train.h5"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    done: dict = {}
    for methods, stage_kills in zip(STAGES, kills):
        reference = ref.stores[methods]
        for kill in stage_kills:
            pending, finished = run_and_kill(path, methods, n, kill)
            stats.kills += 1
            stats.killed_after_finishing += finished
            phase = _phase(path)
            stats.phases[phase] = stats.phases.get(phase, 0) + 1
            if pending is not None:
                _check_pending(pending, done, n)
            done = check_state(path, methods, n, reference, done)
            complete = all(rows == n for rows in done.values())
            stats.complete_after_kill += complete
            stats.unfinished_after_kill += not complete
        pending, _, _ = run_to_end(path, methods, n)
        stats.resumes += 1
        _check_pending(pending, done, n)
        final = raw(path)
        assert final.keys() == reference.keys(), f"datasets {sorted(final)} != {sorted(reference)}"
        for key in reference:
            assert np.array_equal(final[key], reference[key]), f"{key} differs from the uninterrupted run"
        leftovers = [p.name for p in folder.iterdir() if p.name not in ("train.h5", ".train.h5.lock")]
        assert not leftovers, f"left behind: {leftovers}"
        done = {name: n for name in methods}
    stats.identical += 1


def kill_plan(ref: Reference, mode: str, trials: int, kills: int, seed: int | None) -> list[list[list[tuple]]]:
    """For each trial and stage, the kills: random or evenly spread times, evenly spread or every operation."""
    rng = random.Random(seed)
    if mode == "sweep":  # one trial per file operation of each stage, the other stage uninterrupted
        plan = []
        for stage, operations in enumerate(ref.operations):
            plan += [
                [[("event", k)] if s == stage else [] for s in range(len(STAGES))] for k in range(1, operations + 1)
            ]
        return plan
    spread = [[(t * kills + k + 0.5) / (trials * kills) for k in range(kills)] for t in range(trials)]
    if mode == "event":
        return [
            [[("event", max(1, round(f * ops))) for f in spread[t]] for ops in ref.operations] for t in range(trials)
        ]
    if seed is None:
        return [[[("time", f * secs) for f in spread[t]] for secs in ref.seconds] for t in range(trials)]
    return [
        [[("time", rng.uniform(0, 1.1 * secs)) for _ in range(kills)] for secs in ref.seconds] for _ in range(trials)
    ]


def stress(folder: Path, trials: int, kills: int, seed: int | None, n: int = N, mode: str = "time", log=print) -> Stats:
    """Build ``trials`` stores with ``kills`` kills in each stage (see ``kill_plan``) and check them all."""
    folder = Path(folder)
    ref = make_reference(folder, n)
    stats = Stats()
    plan = kill_plan(ref, mode, trials, kills, seed)
    for t, kills_of_trial in enumerate(plan):
        try:
            trial(folder / f"trial{t}", n, ref, kills_of_trial, stats)
        except AssertionError as exc:
            stats.failures.append(f"trial {t} (kills {kills_of_trial}): {exc}")
        stats.trials += 1
        failures = len(stats.failures)
        log(f"trial {t + 1}/{len(plan)}: kills {stats.kills}, identical {stats.identical}, failures {failures}")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--kills", type=int, default=2, help="kills in each stage of each trial")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=N, help="images in the store")
    parser.add_argument("--sweep", action="store_true", help="one trial per file operation instead of random times")
    parser.add_argument("--dir", default="/tmp/roar-store-stress")
    args = parser.parse_args()
    preload()
    shutil.rmtree(args.dir, ignore_errors=True)
    began = time.perf_counter()
    mode = "sweep" if args.sweep else "time"
    stats = stress(Path(args.dir), args.trials, args.kills, args.seed, args.n, mode)
    summary = {k: v for k, v in stats.__dict__.items() if k != "failures"}
    print(json.dumps({**summary, "failures": len(stats.failures), "seconds": round(time.perf_counter() - began, 1)}))
    for failure in stats.failures:
        print("FAIL", failure)
    sys.exit(1 if stats.failures else 0)


if __name__ == "__main__":
    main()
