"""Which device to run on, and how many CPU threads each process uses."""

from __future__ import annotations

import os

import torch

from .errors import FractalError


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FractalError("device=cuda was asked for but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise FractalError("device=mps was asked for but MPS (Apple's GPU backend) is not available")
    return name


def set_cpu_threads(local_world: int, threads: int = 0) -> int:
    """Share this machine's CPU threads among its ``local_world`` processes; returns this one's.

    ``threads`` (the config key) is the machine's total, divided among the processes.
    Unset, an explicit ``OMP_NUM_THREADS`` is taken as this process's count (the variable's
    meaning; torchrun sets it per process), else the usable cores are divided.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if threads:
        n = max(1, threads // local_world)
    elif env.isdigit() and int(env) > 0:
        n = int(env)
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        n = max(1, cores // local_world)
    torch.set_num_threads(n)
    return n
