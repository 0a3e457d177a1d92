"""A sweep shared by several processes on one machine (``retrain.jobs``): the shards of ``--shard i/n``,
started and watched by one parent.

Why processes: a retraining of a small network on a few CPU cores uses them poorly (its convolutions
are too small to split well over threads, and the ROAD solve runs on one thread), so two
single-threaded retrainings side by side finish sooner than two in a row on two threads. Each
child is an ordinary ``roar evaluate --shard k/n`` of the same resolved config, appending to the
shared, locked ``results.csv``; the parent shows one progress bar over the rows they write, and a
child that fails stops the others and is reported by its ``error:`` line. Children get the parent's
cores divided among them (``OMP_NUM_THREADS``), on a GPU machine one GPU each (``CUDA_VISIBLE_DEVICES``,
round robin), and die with the parent (Linux), so a killed sweep leaves no orphan writing behind it;
a rerun resumes from ``results.csv`` as usual.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from roar.core.device import cores
from roar.core.errors import RoarError


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (none on a CPU machine)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def child_env(k: int, jobs: int, gpus: list[str]) -> dict[str, str]:
    """Child k's environment: its share of the cores and, on a GPU machine, GPU k mod #GPUs alone, so
    that ``retrain.jobs`` equal to the number of GPUs runs one retraining per GPU."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores() // jobs)), "PYTHONUNBUFFERED": "1"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
    return env


def run_shards(config_text: str, modes: list[str], jobs: int, out: Path, count_rows, total: int) -> None:
    """Run ``jobs`` shards of the sweep of ``config_text`` (a resolved config) in child processes and wait.

    ``count_rows()`` is the number of rows ``results.csv`` holds; ``total`` the number it will hold at
    the end (the progress bar's length).
    """
    work = out / "jobs"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(config_text)
    mode = "both" if len(modes) == 2 else modes[0]
    gpus = visible_gpus()
    children = []
    for k in range(jobs):
        log = open(work / f"shard-{k}.log", "w")  # noqa: SIM115 - closed when the child is reaped
        command = [sys.executable, "-m", "roar", "retrain", "--mode", mode, "--config", str(config)]
        command += ["--shard", f"{k}/{jobs}"]
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        env = child_env(k, jobs, gpus)
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec)
        children.append((k, child, log))
    start = count_rows()
    bar = tqdm(total=total, initial=start, desc=f"retrain ({jobs} jobs)", unit="run", disable=None)
    try:
        while any(child.poll() is None for _, child, _ in children):
            if any(child.poll() not in (None, 0) for _, child, _ in children):
                break  # one shard failed: stop the others (below) rather than let them run on
            bar.update(count_rows() - bar.n)
            time.sleep(0.5)
        bar.update(count_rows() - bar.n)
    finally:
        bar.close()
        for _, child, _ in children:
            if child.poll() is None:
                child.terminate()
        for _, child, log in children:
            child.wait()
            log.close()
        config.unlink(missing_ok=True)  # the shards' copy of the config; their logs stay for reading
    # The shard that failed first is the one with an error of its own; the others were stopped here.
    for k, child, _ in sorted(children, key=lambda item: item[1].returncode < 0):
        if child.returncode != 0:
            lines = (work / f"shard-{k}.log").read_text(errors="replace").strip().splitlines()
            reason = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
            raise RoarError(
                f"shard {k}/{jobs} of the sweep failed (exit {child.returncode}): "
                f"{reason.removeprefix('error: ')[:300]} (log: {work / f'shard-{k}.log'})"
            )
