"""Rotary position embeddings with half-split pairing (dim i rotates with i + h/2)."""

from __future__ import annotations

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
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
        cos, sin = angles.cos().float(), angles.sin().float()
        # (max_len, 1, head_dim): a slice broadcasts over the heads of the (B, T, H, head_dim)
        # layout as it is, with no unsqueeze per decode step
        self.register_buffer("cos", torch.cat((cos, cos), -1)[:, None], persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin), -1)[:, None], persistent=False)

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
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)
