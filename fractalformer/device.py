"""Which device to run on, in which precision, how many CPU threads each process uses, and
how the CPU allocator keeps memory between training steps."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import warnings

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


MMAP_THRESHOLD = 32 << 20  # glibc's largest: allocations below it come from the heap
TRIM_THRESHOLD = 256 << 20  # freed heap memory kept for the next step, up to this much


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    By default glibc trims the heap and maps large blocks afresh, so each training step's
    activations land on new pages and fault them in again: at nanoGPT's CPU shapes about
    1,200-1,700 page faults a step, ~10-25% of its time (``python -m bench.bench_nanogpt``).
    Fixed thresholds turn that off. Process-wide; a no-op where the C library is not glibc.
    Returns whether the thresholds were set.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX, through oneDNN);
    elsewhere bf16 matmuls are emulated, tens of times slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """The ``dtype`` setting as a context: bf16 autocast for ``bfloat16`` (and for ``auto``
    on CUDA), else nothing (float32). bf16 on a CPU without native bf16 warns: there it runs
    about 40x slower than float32 (156 s against 3.9 s a step of ``--preset fractal-512``)."""
    if not (dtype == "bfloat16" or (dtype == "auto" and device == "cuda")):
        return contextlib.nullcontext()
    if device == "cpu" and not cpu_has_native_bf16():
        warnings.warn("bfloat16 on this CPU is emulated (no AVX512-BF16 / AMX): about 40x slower than "
                      "float32 here; use --set dtype=float32 (train) or --dtype float32", stacklevel=2)
    return torch.autocast(device, dtype=torch.bfloat16)
