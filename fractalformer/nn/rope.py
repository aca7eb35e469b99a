"""Rotary position embeddings with half-split pairing (dim i rotates with i + h/2)."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Precomputed cos/sin tables for positions ``0 .. max_len - 1``."""

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape (B, H, T, head_dim) whose first position is ``start``
        (or, a (B,) tensor, row ``b``'s first position is ``start[b]``)."""
        t = x.shape[-2]
        if isinstance(start, torch.Tensor):
            pos = start[:, None] + torch.arange(t, device=x.device)  # (B, T)
            cos, sin = self.cos[pos][:, None].to(x.dtype), self.sin[pos][:, None].to(x.dtype)
        else:
            cos = self.cos[start : start + t].to(x.dtype)
            sin = self.sin[start : start + t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
