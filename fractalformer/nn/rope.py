"""Rotary position embeddings with half-split pairing (dim i rotates with i + h/2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Rotary(nn.Module):
    """Precomputed cos/sin tables for positions ``0 .. max_len - 1``.

    The tables are full head width (``cos`` twice; ``-sin`` then ``sin``), so a rotation is
    ``x * cos + roll(x, h/2) * sin``: three ops (a roll, a multiply, a fused multiply-add)
    instead of the eight of the split-multiply-concatenate form, which matters when a
    decode step is dominated by per-op overhead.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_len, self.theta = head_dim, max_len, theta
        # (max_len, 1, head_dim): a slice broadcasts over the heads of the (B, T, H, head_dim)
        # layout as it is, with no unsqueeze per decode step
        cos, sin = self._tables(torch.promote_types(torch.get_default_dtype(), torch.float32), None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, dtype: torch.dtype, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables computed in float64 and rounded once to ``dtype``."""
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64,
                                                device=device) / self.head_dim)
        angles = torch.outer(torch.arange(self.max_len, dtype=torch.float64, device=device), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        return (torch.cat((cos, cos), -1)[:, None].to(dtype),
                torch.cat((-sin, sin), -1)[:, None].to(dtype))

    def _apply(self, fn: Any, recurse: bool = True) -> Rotary:
        """Recompute the tables after a move or cast (``.double()``, ``.half()``): casting the
        float32 tables would carry float32 error into a float64 model."""
        super()._apply(fn, recurse)
        self.cos, self.sin = self._tables(self.cos.dtype, self.cos.device)
        return self

    def forward(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape (B, H, T, head_dim) whose first position is ``start``
        (or, a (B,) tensor, row ``b``'s first position is ``start[b]``)."""
        t = x.shape[-2]
        if isinstance(start, torch.Tensor):
            pos = start[:, None] + torch.arange(t, device=x.device)  # (B, T)
            return self._rotate(x, self.cos[pos].transpose(1, 2), self.sin[pos].transpose(1, 2))
        return self._rotate(x, self.cos[start : start + t, 0], self.sin[start : start + t, 0])

    def at(self, x: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape (B, T, H, head_dim), the layout a fused projection comes
        out in: positions ``pos .. pos + T - 1`` (an int), or explicit positions (T,) or (B, T)."""
        if isinstance(pos, int):
            t = x.shape[1]
            return self._rotate(x, self.cos[pos : pos + t], self.sin[pos : pos + t])
        return self._rotate(x, self.cos[pos], self.sin[pos])

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _Rotation.apply(x, cos, sin)
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class _Rotation(torch.autograd.Function):
    """``x * cos + roll(x, h/2) * sin`` with its backward written out (``g * cos`` plus
    ``g * sin`` rolled back): one autograd node and three ops each way, where autograd records
    three nodes and four ops backward (an eager training step pays per op)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return torch.addcmul((g * sin).roll(-(g.shape[-1] // 2), -1), g, cos), None, None
