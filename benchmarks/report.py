"""What every benchmark writes: its own ``##`` section of docs/benchmarks.md, with the machine."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

INTRO = (
    "# Benchmarks\n\n"
    "Figures produced by `task bench`; ratios against a reference measured in the same run "
    "(same process, model, inputs and chunk sizes), so they hold up when absolute speeds vary with "
    "the machine and its load.\n"
)


def machine(load_start: float, load_end: float, *extra: str) -> str:
    """CPU, cores, torch (and ``extra`` library versions), threads and the load around the run."""
    cpu = platform.processor() or "unknown CPU"
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join([f"torch {torch.__version__}", *extra])
    return (
        f"{cpu}, {os.cpu_count()} cores ({usable} usable), {versions}, "
        f"{torch.get_num_threads()} intra-op threads (torch default); load average "
        f"{load_start:.2f} before, {load_end:.2f} after"
    )


def header(heading: str, command: str, load_start: float, load_end: float, *extra: str) -> list[str]:
    """The first lines of every section: its heading, the machine (with ``extra`` library versions),
    the command and the date."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        heading,
        "",
        f"- Machine: {machine(load_start, load_end, *extra)}.",
        f"- Command: `{command}`",
        f"- Date: {date}",
    ]


def write_section(path: Path, section: str) -> None:
    """Replace the ``##`` section of ``path`` whose heading is ``section``'s first line (or append
    it), keeping the others."""
    heading = section.splitlines()[0].rstrip()
    text = path.read_text() if path.exists() else INTRO
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        text = text.rstrip() + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def log(msg: str) -> None:
    """Progress goes to stderr, so that stdout carries only the section."""
    print(msg, file=sys.stderr, flush=True)


def bench_parser(module: str, doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--quick`` (a smoke-sized preset) and ``--write MD``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--write", type=Path, metavar="MD", help="write/replace the section in this markdown file")
    return parser


def bench_run(
    module: str,
    argv: Sequence[str] | None,
    write: Path | None,
    measure: Callable[[Callable[[str], None]], Any],
    render: Callable[[str, Any, float, float], str],
) -> int:
    """Measure (logging the threads and the load before and after), print the rendered section and,
    with ``write``, replace it in that markdown file. ``render(command, result, load_start, load_end)``."""
    command = " ".join([f"python -m {module}", *(sys.argv[1:] if argv is None else argv)])
    load_start = os.getloadavg()[0]
    log(f"threads {torch.get_num_threads()}, load average {load_start:.2f}")
    t0 = time.perf_counter()
    result = measure(log)
    load_end = os.getloadavg()[0]
    log(f"total {time.perf_counter() - t0:.0f} s")
    section = render(command, result, load_start, load_end)
    print(section)
    if write:
        write_section(write, section)
        log(f"wrote {write}")
    return 0
