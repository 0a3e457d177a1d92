"""Data parallelism across processes: torchrun's environment, the process group, and the few
collective steps a stage needs (split the work, agree on rank 0's decision, sum, broadcast).

Under ``torchrun`` (``WORLD_SIZE`` > 1, with ``RANK`` and ``LOCAL_RANK``) ``init`` joins the
process group: nccl with the device ``cuda:LOCAL_RANK`` on CUDA, gloo on the CPU. Rank 0 is the
*main* rank: it alone takes the output folder's lock and writes files; the others read nothing
it might be writing and wait at a collective instead. Every helper here is a no-op for a single
process (``SINGLE``), so callers hold one code path, not two, and a run without torchrun takes
exactly the steps it always took.

Decisions that can fail (a refused checkpoint, a held lock) are taken on rank 0 by ``on_main``
and sent to every rank with their error: a failure on rank 0 alone would otherwise leave the
other ranks waiting at their next collective until the process group times out.

``launch`` re-executes a roar command through torchrun (``roar train --nproc N``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from roar.core.device import cores
from roar.core.errors import RoarError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: its global ``rank``, the ``size`` of the
    world and its ``local_rank`` on its machine (which GPU it uses)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()
"""One process: what every caller gets without torchrun."""


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise RoarError(
                f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but {name} is not set: start distributed runs "
                "through torchrun (python -m torch.distributed.run ... -m roar train) or 'roar train --nproc N'"
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise RoarError(f"environment variable {name}={value!r} is not an integer") from None


def world() -> World:
    """This process's world: from the process group once it is initialised, else from torchrun's
    environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); ``SINGLE`` without either."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return SINGLE
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank < size or local_rank < 0:
        raise RoarError(f"RANK={rank}, LOCAL_RANK={local_rank} do not fit WORLD_SIZE={size}")
    return World(rank, size, local_rank)


def is_main() -> bool:
    """True unless this process is a rank other than 0 of a distributed run."""
    return world().main


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group when started by torchrun; returns the world and the device to use.

    On CUDA each process takes ``cuda:LOCAL_RANK`` (whatever index the config named: one GPU per
    process is what data parallelism means) and nccl; on the CPU, gloo. A single process gets
    ``SINGLE`` and ``device`` back untouched. Calling it again is harmless.
    """
    w = world()
    if not w.distributed:
        return w, device
    if device.type == "cuda":
        if w.local_rank >= torch.cuda.device_count():
            raise RoarError(
                f"LOCAL_RANK {w.local_rank} needs GPU {w.local_rank}, but {torch.cuda.device_count()} are visible: "
                "start at most one process per GPU (--nproc)"
            )
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
        backend, bound = "nccl", {"device_id": device}
    elif device.type == "cpu":
        backend, bound = "gloo", {}
    else:
        raise RoarError(f"distributed training runs on CUDA (nccl) or the CPU (gloo), not on {device}")
    if not dist.is_initialized():
        dist.init_process_group(backend, **bound)
    return world(), device


def shutdown() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(w: World = SINGLE) -> None:
    """Wait until every rank has arrived (for ranks that must not read before rank 0 has written)."""
    if w.distributed:
        dist.barrier()


def torchrun_shard() -> str | None:
    """``"RANK/WORLD_SIZE"`` when torchrun launched this process for a sharded stage (extraction, VoG
    gradients: each rank one shard, on its own GPU ``LOCAL_RANK``), else None. Such ranks share
    nothing but their files, so no process group is joined."""
    w = world()
    if not w.distributed:
        return None
    if torch.cuda.is_available():
        torch.cuda.set_device(w.local_rank)
    return f"{w.rank}/{w.size}"


# ---------------------------------------------------------------- splitting the work


def per_rank_batch(batch_size: int, size: int, key: str = "training.batch_size") -> int:
    """The batch of one rank when ``batch_size`` is the global batch of ``size`` ranks; a one-line
    RoarError if it does not divide, since rounding would silently change the recipe."""
    if size > 1 and batch_size % size:
        raise RoarError(
            f"{key} {batch_size} is the global batch and must divide evenly by the {size} processes "
            f"(e.g. {max(batch_size // size, 1) * size} or {(batch_size // size + 1) * size})"
        )
    return batch_size // size


def shard(order: torch.Tensor, batch_size: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s part of an epoch's ``order`` (the same on every rank), in the order it trains.

    ``batch_size`` is one rank's batch, B = ``batch_size`` × ``size`` the global one. Step i's
    global batch is ``order[i·B : (i+1)·B]``, exactly the batch one process with batch B takes at
    step i, and rank r takes its r-th run of ``batch_size`` consecutive entries. The last
    ``len(order) mod B`` entries are dropped, as ``drop_last`` drops a short last batch in one
    process, so every rank takes the same number of equal steps (a rank with one step more would
    wait forever in its all-reduce) and no example is seen twice in an epoch: nothing is padded.
    An order shorter than B is one step of ``len(order) // size`` entries per rank (one process
    takes it whole), dropping ``len(order) mod size``.
    """
    n, total = len(order), batch_size * size
    steps, per = (n // total, batch_size) if n >= total else (1, n // size)
    return order[: steps * per * size].view(steps, size, per)[:, rank].reshape(-1)


def split(order: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous part of ``order`` with nothing dropped (parts differ by at most one):
    for evaluation, where every example counts and no collective runs per batch."""
    return order.tensor_split(size)[rank]


# ---------------------------------------------------------------- agreeing and summing


def _collective_device() -> torch.device:
    """Where tensors must be for the backend: nccl reduces on the GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: T, w: World = SINGLE) -> T:
    """Rank 0's ``obj`` on every rank (pickled; for small things and for a checkpoint once per run)."""
    if not w.distributed:
        return obj
    box = [obj if w.main else None]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def on_main(fn: Callable[[], T], w: World = SINGLE) -> T:
    """``fn()`` run on rank 0 only, its result sent to every rank; if it fails, every rank raises.

    Rank 0 re-raises its own exception; the others raise a RoarError with its message, so that all
    ranks stop together instead of waiting for a rank 0 that has already left.
    """
    if not w.distributed:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    error: BaseException | None = None
    if w.main:
        try:
            outcome = ("ok", fn())
        except RoarError as exc:
            outcome, error = ("error", str(exc)), exc
        except Exception as exc:
            outcome, error = ("error", f"rank 0 failed: {type(exc).__name__}: {exc}"), exc
    kind, value = broadcast_object(outcome, w)
    if error is not None:
        raise error
    if kind == "error":
        raise RoarError(value)
    return value


def main_first(fn: Callable[[], T], w: World = SINGLE) -> T:
    """``fn()`` on every rank, rank 0 first and alone: for work that fills a cache on disk (a
    dataset's first build), which the other ranks then only read. A failure on rank 0 stops all."""
    if not w.distributed:
        return fn()
    kept: list = []
    on_main(lambda: kept.append(fn()), w)  # the result stays on rank 0: a dataset is not sent over the wire
    return kept[0] if w.main else fn()


def sum_over_ranks(tensor: torch.Tensor, w: World = SINGLE) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over all ranks, identical on every rank, on ``tensor``'s device."""
    if not w.distributed:
        return tensor
    moved = tensor.to(_collective_device()).contiguous()
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.to(tensor.device)


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], w: World = SINGLE) -> None:
    """Overwrite ``tensors`` in place with rank 0's values, one message per dtype (any memory layout)."""
    if not w.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    device = _collective_device()
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        dist.broadcast(flat, src=0)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view(t.shape))


def broadcast_modules(modules: Sequence[torch.nn.Module], w: World = SINGLE) -> None:
    """Give every rank rank 0's parameters and buffers of ``modules`` (each module once)."""
    if not w.distributed:
        return
    seen: set[int] = set()
    tensors = []
    for module in modules:
        for t in module.state_dict().values():
            if id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
    broadcast_tensors(tensors, w)


def wrap(model: torch.nn.Module, device: torch.device, w: World = SINGLE) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (the module to call for training steps), or ``model`` itself
    for a single process. The wrapper shares ``model``'s parameters: optimisers, averages and
    checkpoints keep using ``model``, whose state dict has no ``module.`` prefix.

    Plain DDP, not SyncBatchNorm: each rank normalises with the statistics of its own part of the
    global batch, and the running statistics are rank 0's (DDP broadcasts its buffers at every
    training forward). SyncBatchNorm would make the statistics those of the global batch, as in
    one process, but PyTorch runs it on GPUs only (a CPU/gloo run could not use or test it) and it
    costs two collectives per BatchNorm layer per step; with a few dozen images per rank the
    per-rank statistics are as good, and their extra noise is the familiar "ghost batch" one.
    Per-rank batches of a handful of images do train differently: keep ``batch_size`` /
    ``world size`` at 16 or more.
    """
    if not w.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


# ---------------------------------------------------------------- launching


def torchrun_command(
    args: Sequence[str],
    nproc: int,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> list[str]:
    """The torchrun command line that runs ``python -m roar <args>`` in ``nproc`` processes per node.

    One node: ``--standalone`` (a free local port, nothing to configure). Several nodes: torchrun's
    static rendezvous (every node runs the same command with its own ``node_rank``; ``master_addr``
    and ``master_port`` name node 0). Other rendezvous setups (c10d with an endpoint, elastic
    restarts) are run with torchrun itself: ``torchrun <its options> -m roar train ...``.
    """
    if nproc < 1 or nnodes < 1:
        raise RoarError(f"--nproc {nproc} and --nnodes {nnodes} must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise RoarError(f"--node-rank {node_rank} must be from 0 to {nnodes - 1} (--nnodes {nnodes})")
    command = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and master_addr is None and master_port is None:
        command.append("--standalone")
    else:
        command += ["--nnodes", str(nnodes), "--node-rank", str(node_rank)]
        command += ["--master-addr", master_addr or "127.0.0.1", "--master-port", str(master_port or 29500)]
    return [*command, "--nproc-per-node", str(nproc), "-m", "roar", *args]


def launch(
    args: Sequence[str],
    nproc: int,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    batch_size: int | None = None,
) -> int:
    """Run ``python -m roar <args>`` through torchrun in ``nproc`` processes per node and return
    torchrun's exit status (0 when every rank finished).

    ``batch_size`` (the config's global batch) is checked against the world size first, so a batch
    that does not divide is refused in one line before any process starts. ``OMP_NUM_THREADS`` is
    set, when unset, to the cores per process (torchrun would set 1 and say so at length). A
    SIGINT or SIGTERM received while waiting is passed on to torchrun, which stops its workers;
    the run then resumes from its last checkpoint when started again.
    """
    if batch_size is not None:
        per_rank_batch(batch_size, nproc * nnodes)
    command = torchrun_command(
        args, nproc, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port
    )
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(cores() // nproc, 1)))
    proc = subprocess.Popen(command, env=env)

    def forward(signum, _frame):
        proc.send_signal(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if in_main_thread else None
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached torchrun too; one sent to this process alone is passed on.
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait()
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
