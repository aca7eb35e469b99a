"""Decoding shortcuts, all behind one context: :class:`frozen_weights`.

Generation, evaluation and the server promise that no weight changes while they run, and
enter a :class:`frozen_weights` block. Inside it, and only there:

* tensors made from parameters - the weight slices of a nested level, norm scales, a
  level embedding row, an extracted draft model - are computed once and kept by the
  block (:func:`memo`, :func:`sliced`), so decoding a sub-model does not re-gather its
  weights at every token;
* a level-0 linear layer fed a few rows on the CPU (speculative verification) multiplies
  as a matrix-vector pass does (:func:`linear`).

Outside a block every helper is the plain computation, so training and any write to the
weights (an optimizer step, ``p.data.copy_``, loading a checkpoint) never meet a stale copy;
a version counter would miss writes through ``.data``. What a block keeps lives in the
block, never on the modules, and goes with it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

FEW_ROWS = 16  # up to this many rows a CPU linear layer reads its weight as a matrix-vector pass


class _Open(threading.local):
    block: frozen_weights | None = None  # the outermost block entered in this thread


_OPEN = _Open()


class frozen_weights:
    """While entered, weights are taken as fixed: the decoding shortcuts of this module apply.

    A generator enters its block around each step rather than across ``yield``, so nothing
    stays open while the caller runs; what the block kept stays valid for it alone (a new
    block computes afresh). Blocks nest (the outermost keeps) and are per thread.
    """

    def __init__(self) -> None:
        self.kept: weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, Any]] = weakref.WeakKeyDictionary()
        self._outermost = False

    def __enter__(self) -> frozen_weights:
        self._outermost = _OPEN.block is None
        if self._outermost:
            _OPEN.block = self
        return self

    def __exit__(self, *_: object) -> None:
        if self._outermost:
            _OPEN.block = None
            self._outermost = False


def memo(module: torch.nn.Module, key: object, params: tuple[torch.Tensor, ...],
         compute: Callable[[], Any]) -> Any:
    """``compute()``, something made from ``params`` of ``module``; inside a block, without
    autograd on ``params``, computed once for the block and kept under ``key``."""
    if torch.compiler.is_compiling():  # the graph holds the result; no guard on the block
        return compute()
    block = _OPEN.block
    if block is None or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return compute()
    kept = block.kept.setdefault(module, {})
    if key not in kept:
        kept[key] = compute()
    return kept[key]


def sliced(module: torch.nn.Module, name: str, level: int, transpose: bool = False) -> torch.Tensor:
    """``module.nest.take`` of parameter ``name`` at ``level`` (optionally transposed and made
    contiguous: bmm is ~2x slower on a transposed view on CPU), kept inside a block."""
    def take() -> torch.Tensor:
        t = module.nest.take(getattr(module, name), level, module.nest_dims[name])
        return t.transpose(1, 2).contiguous() if transpose else t
    return memo(module, (name, level, transpose), (getattr(module, name),), take)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``. Inside a block, with 2 .. :data:`FEW_ROWS` float32 rows on
    the CPU, ``x W^T`` as one GEMM costs ~1.5x a one-row pass; ``(W x^T)^T`` reads the weight
    as a matrix-vector pass does (made contiguous again: attention takes its slow path on a
    transposed query)."""
    rows = x.numel() // x.shape[-1]
    if (1 < rows <= FEW_ROWS and x.device.type == "cpu" and x.dtype == torch.float32
            and (torch.compiler.is_compiling() or _OPEN.block is not None)):
        y = torch.mm(weight, x.reshape(rows, -1).t()).t()
        return (y if bias is None else y + bias).contiguous().view(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)
