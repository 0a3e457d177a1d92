"""Device choice and the speedups that depend on it (bf16 autocast, channels_last, pinned memory).

Every stage asks here rather than testing ``torch.cuda.is_available()`` itself, so a config's
``device: cpu`` or ``training.amp: false`` is honoured everywhere in the same way.
"""

from __future__ import annotations

import contextlib
import os

import torch

from roar.core.errors import RoarError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; an unavailable explicit choice is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RoarError(f"device '{name}' requested but CUDA is not available here (use device=auto or cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RoarError("device 'mps' requested but it is not available here (use device=auto or cpu)")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere (CPU runs stay float32)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a Slurm or container limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_channels_last_is_safe() -> bool:
    """Whether oneDNN computes channels_last convolutions correctly on this CPU.

    On CPUs without AVX-512 oneDNN runs its AVX2 kernels, whose backward pass of a strided 1×1
    convolution in channels_last (ResNet's downsampling shortcut) computes wrong gradients and,
    with fewer input channels than its block of 8, writes past its workspace (oneDNN issue
    #6035, open): training goes astray or the process dies of heap corruption. There the CPU
    keeps the default layout; AVX-512 CPUs and GPUs are unaffected.
    """
    return torch.backends.cpu.get_cpu_capability() not in {"DEFAULT", "NO AVX", "AVX", "AVX2"}


def memory_format(device: torch.device, channels_last: bool = True) -> torch.memory_format:
    """channels_last when enabled: convolutions run faster in it on CUDA and, with oneDNN on an
    AVX-512 CPU, on the CPU too (about 1.5× for ResNet8 training on 2 cores); on other CPUs it is
    not safe (``cpu_channels_last_is_safe``) and the default layout is kept."""
    if not channels_last or (device.type == "cpu" and not cpu_channels_last_is_safe()):
        return torch.contiguous_format
    return torch.channels_last


def pin_memory(device: torch.device) -> bool:
    return device.type == "cuda"


@contextlib.contextmanager
def one_cpu_thread(device: torch.device = torch.device("cpu")):
    """Run CPU work with one intra-op thread, restoring the setting afterwards (process-wide, like
    ``torch.set_num_threads`` itself); on an accelerator, nothing changes.

    For long sequences of small operations (the ROAD solver, the VoG toy's 450 × 16 tensors): split
    over threads they gain little, and when another process occupies a core every operation waits
    at a barrier for the descheduled thread (measured on 2 shared cores: 50–100× slower).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
