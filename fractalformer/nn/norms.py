"""RMSNorm with a zero-initialised ``(1 + w)`` scale, as the seed FractalFormer.

Each sub-model normalises over its own dims and uses its own slice of the scale.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .decode import memo, sliced
from .nesting import Nesting


def widen(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the wider of float32 and its own dtype: half precision is lifted for stable
    statistics, while a float64 model keeps float64 all the way through."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / rms(x) * scale`` over the last dim (``scale`` of that width, or None); one fused
    op where torch has it (>= 2.4): a quarter of the norm's cost in a decode step."""
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, x.shape[-1:], scale, eps)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if scale is None else y * scale


class _TrainingRMSNorm(torch.autograd.Function):
    """``x / rms(x) * (1 + w)`` with the backward written out: a handful of ops each way where
    autograd records about twenty per norm (an eager training step pays per op).
    ``w`` broadcasts against ``x``: (width,), or (count, 1, 1, width) for a level."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
        xhat, scale = x * r, 1.0 + w
        ctx.save_for_backward(xhat, r, scale)
        return xhat * scale

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        xhat, r, scale = ctx.saved_tensors
        gs = g * scale
        dx = torch.addcmul(gs, xhat, (gs * xhat).mean(-1, keepdim=True), value=-1).mul_(r)
        return dx, (g * xhat).sum_to_size(scale.shape), None


class RMSNorm(nn.Module):
    def __init__(self, nest: Nesting, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.nest, self.eps = nest, eps
        self.nest_dims = {"weight": (1,)}
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """x: (count, B, T, width); statistics in at least float32 for bf16 safety."""
        xf = widen(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            w = widen(self.weight) if level == 0 else widen(sliced(self, "weight", level))[:, None, None, :]
            y = _TrainingRMSNorm.apply(xf, w, self.eps)
        elif level == 0:
            y = rms_norm(xf, self.scale(0), self.eps)
        else:  # one scale per sub-model: the fused op takes a single one
            y = rms_norm(xf, None, self.eps) * self.scale(level)[:, None, None, :]
        return y if y.dtype == x.dtype else y.type_as(x)

    def scale(self, level: int) -> torch.Tensor:
        """``1 + w`` of the sub-models of ``level`` in at least float32: (width,) at level 0,
        else (count, width); made once per :func:`frozen_weights` block while decoding."""
        def compute() -> torch.Tensor:
            s = 1.0 + widen(sliced(self, "weight", level))
            return s[0] if level == 0 else s
        return memo(self, ("scale", level), (self.weight,), compute)
