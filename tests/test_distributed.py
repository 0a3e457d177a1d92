"""Data-parallel training through torchrun (gloo, 2 CPU processes) and the helpers behind it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from roar.core.errors import RoarError
from roar.training import distributed
from roar.training.checkpoint import load_checkpoint

# ------------------------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize("n, batch, size", [(256, 32, 2), (250, 32, 2), (100, 16, 3), (20, 16, 2), (64, 64, 1)])
def test_ranks_split_each_global_batch_without_overlap_or_padding(n, batch, size):
    """Step i's global batch is one process's batch i (batch × size consecutive entries of the order),
    split among the ranks; every rank takes the same number of steps and nothing is seen twice."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    parts = [distributed.shard(order, batch, r, size) for r in range(size)]
    assert len({len(p) for p in parts}) == 1
    taken = torch.cat(parts)
    assert len(taken.unique()) == len(taken), "an example taken twice"
    per = len(parts[0]) // max(1, len(parts[0]) // batch) if n >= batch * size else len(parts[0])
    steps = len(parts[0]) // per
    for i in range(steps):
        step = torch.cat([p[i * per : (i + 1) * per] for p in parts])
        assert torch.equal(step, order[i * per * size : (i + 1) * per * size])
    assert n - len(taken) < max(batch * size, size) or n < batch * size


def test_evaluation_splits_keep_every_example_once():
    order = torch.arange(11)
    assert torch.equal(torch.cat([distributed.split(order, r, 3) for r in range(3)]), order)


def test_a_global_batch_that_does_not_divide_is_refused_in_one_line():
    assert distributed.per_rank_batch(48, 2) == 24 and distributed.per_rank_batch(50, 1) == 50
    with pytest.raises(RoarError, match=r"training.batch_size 50 .* 3 processes \(e.g. 48 or 51\)"):
        distributed.per_rank_batch(50, 3)


def test_torchrun_command_standalone_on_one_machine_and_static_rendezvous_across_several():
    one = distributed.torchrun_command(["train", "--config", "c.yaml"], 4)
    assert one[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "4",
        "-m",
        "roar",
        "train",
        "--config",
        "c.yaml",
    ]
    two = distributed.torchrun_command(["train"], 8, nnodes=2, node_rank=1, master_addr="node0", master_port=29400)
    joined = " ".join(two)
    assert "--nnodes 2 --node-rank 1 --master-addr node0 --master-port 29400 --nproc-per-node 8" in joined
    with pytest.raises(RoarError, match="--node-rank 2"):
        distributed.torchrun_command(["train"], 1, nnodes=2, node_rank=2)


def test_the_world_comes_from_torchruns_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() == distributed.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RoarError, match="RANK is not set"):
        distributed.world()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.world() == distributed.World(3, 4, 1) and not distributed.world().main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(RoarError, match="do not fit WORLD_SIZE=4"):
        distributed.world()


# ------------------------------------------------------------------------------------------------ training

REPO = Path(__file__).resolve().parents[1]


def _sets(data_root, out, *extra):
    return [
        f"dataset.root={data_root}",
        f"output_dir={out}",
        "dataset.test_size=256",
        "training.snapshots={epochs: []}",
        *extra,
    ]


# No BatchNorm and no augmentation: two ranks must take one process's steps (up to rounding).
MLP = [
    "model={name: mlp, hidden: [256, 256]}",
    "dataset.train_size=1536",
    "training.epochs=6",
    "training.batch_size=64",
    "training.optimizer={name: sgd, lr: 0.05, momentum: 0.9}",
    "training.augment={crop_padding: 0, flip: false}",
]


def _command(sets, nproc=2):
    args = [x for s in sets for x in ("--set", s)]
    return [sys.executable, "-m", "roar", "train", "--nproc", str(nproc), "--config", "configs/smoke.yaml", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_here(sets):
    from roar.config import load_config
    from roar.stages.train import run

    return run(load_config(REPO / "configs" / "smoke.yaml", sets))


def _descendants(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [d for c in map(int, children) for d in (c, *_descendants(c))]


def _rank_pid(root: int, rank: int) -> int | None:
    for pid in _descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
@pytest.mark.timeout(600)
def test_two_ranks_take_one_process_steps_and_resume_after_a_rank_is_killed(data_root, tmp_path, one_thread):
    """Without BatchNorm and augmentation, DDP's averaged gradients of two half batches are one
    process's gradient of the whole batch: the same losses, accuracies and weights, up to rounding.
    kill -9 of rank 1 stops the run with one error line; the rerun continues from rank 0's last
    checkpoint without redoing an epoch, and ends where one process ends."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _train_here(_sets(data_root, single, *MLP))

    proc = subprocess.Popen(
        _command(_sets(data_root, ddp, *MLP)), cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True
    )
    last = ddp / "train" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "error: torchrun exited with status" in err, err
    assert not (ddp / "train" / "summary.json").exists(), "the run finished before a rank could be killed"
    done = load_checkpoint(last)["epoch"]
    assert 1 <= done < 6
    kept = [m for m in _metrics(ddp) if m["epoch"] <= done]

    resumed = subprocess.run(
        _command(_sets(data_root, ddp, *MLP)), cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "trained mlp on shapes" in resumed.stdout and resumed.stdout.count("trained") == 1, "rank 0 alone prints"
    metrics = _metrics(ddp)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5, 6] and metrics[:done] == kept, "finished epochs were redone"
    for a, b in zip(_metrics(single), metrics, strict=True):
        assert a["step"] == b["step"] and a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=2 / 1536)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=2 / 256)
    one = load_checkpoint(single / "train" / "model.pt")["state_dict"]
    two = load_checkpoint(ddp / "train" / "model.pt")["state_dict"]
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=0, atol=0.01 * float(v.abs().max()) + 1e-6, msg=k)
    summary = json.loads((ddp / "train" / "summary.json").read_text())
    assert summary["processes"] == 2 and json.loads((ddp / "train" / "provenance.json").read_text())["world_size"] == 2


def test_a_batch_that_does_not_divide_is_refused_before_any_process_starts(data_root, tmp_path, capsys, monkeypatch):
    from roar import cli

    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    args = _command(_sets(data_root, tmp_path / "run", "training.batch_size=63"))[3:]
    assert cli.main(args) == 2 and not started and not (tmp_path / "run").exists()
    assert "must divide evenly by the 2 processes" in capsys.readouterr().err
