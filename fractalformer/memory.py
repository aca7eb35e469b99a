"""Sizes checked before anything is allocated.

A config whose weights, or whose training step, cannot fit this machine's memory is refused
with one line instead of dying in the allocator (or swapping for minutes first). The
estimates are lower bounds - the tensors every family allocates at least - so a config
that is refused could never have run here, while one that passes may still be too big.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ModelConfig, RunConfig
from .errors import FractalError

FLOAT = 4  # bytes of a float32: weights, gradients and Adam moments
GIB = 1 << 30


def param_count(c: ModelConfig) -> int:
    """Parameters of the embedding, attention, MLPs and expert tables (families add to these)."""
    sparse = len(c.sparse_layers())
    mlp = 3 * c.d_model * c.mlp_hidden
    tables = c.moe.n_experts * c.d_model + (mlp if c.moe.with_mlp else 0)
    attn = 2 * c.d_model * c.head_dim * (c.n_head + c.n_kv_head)
    return c.vocab_size * c.d_model + c.n_layer * attn + (c.n_layer - sparse) * mlp + sparse * tables


def weight_bytes(c: ModelConfig) -> int:
    """Bytes of building the model: float32 weights, and the peak of its first RoPE table
    (float64 angles, cosines and sines, then the float32 tables: 24 bytes a position and dim)."""
    return FLOAT * param_count(c) + 24 * c.block_size * c.head_dim


def machine_bytes(accelerators: bool) -> int | None:
    """This machine's memory (with ``accelerators``, plus every CUDA device's); None where the
    system does not say."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    if accelerators and torch.cuda.is_available():
        total += sum(torch.cuda.get_device_properties(i).total_memory
                     for i in range(torch.cuda.device_count()))
    return total


def _refuse(need: int, what: str, fix: str, accelerators: bool) -> None:
    have = machine_bytes(False)
    if have is not None and need > have:
        have = machine_bytes(accelerators)
    if have is not None and need > have:
        raise FractalError(f"{what} needs at least {need / GIB:,.1f} GiB, more than this machine's "
                           f"{have / GIB:,.1f} GiB of memory; {fix}")


def check_model_fits(c: ModelConfig) -> None:
    """Refuse a model whose weights cannot be built in host memory (where every model is built)."""
    _refuse(weight_bytes(c), f"a model of d_model {c.d_model:,}, n_layer {c.n_layer:,}, block_size "
            f"{c.block_size:,} and vocab_size {c.vocab_size:,}", "choose smaller dimensions", False)


def check_weights_file(path: Path, c: ModelConfig) -> None:
    """Refuse a config that describes more parameters than the weights file can hold (2 bytes
    each at the least) when building it would cost over a GiB only to find its shapes differ
    (smaller models are built, and their shapes compared one by one)."""
    if weight_bytes(c) > GIB and path.is_file() and path.stat().st_size < 2 * param_count(c):
        raise FractalError(f"{path} holds {path.stat().st_size:,} bytes, too few for the at least "
                           f"{param_count(c):,} parameters its config.json describes: the config does not "
                           f"belong to these weights")


def check_training_fits(cfg: RunConfig) -> None:
    """Refuse a training run whose model or one step cannot fit (devices' memory counted too): a
    step holds the weights, their gradients and two Adam moments, and a micro-batch's int64 windows,
    logits and one state per layer (in bf16, the least autocast keeps)."""
    m, t = cfg.model, cfg.train
    check_model_fits(m)
    rows = -(-t.batch_size // t.grad_accum)
    state = 4 * FLOAT * param_count(m)
    batch = rows * m.block_size * (3 * 8 + 2 * (m.vocab_size + m.n_layer * m.d_model))
    fix = "lower batch_size or raise grad_accum" if batch > state else "choose smaller dimensions"
    _refuse(state + batch, f"training (weights, gradients and Adam moments: {state / GIB:,.1f} GiB; a "
            f"micro-batch of {rows:,} x {m.block_size:,} tokens: {batch / GIB:,.1f} GiB)", fix, True)
