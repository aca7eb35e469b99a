"""RMSNorm with a zero-initialised ``(1 + w)`` scale, as the seed FractalFormer.

Each sub-model normalises over its own dims and uses its own slice of the scale.
"""

from __future__ import annotations

import torch
from torch import nn

from .nesting import Nesting, take_cached


class RMSNorm(nn.Module):
    def __init__(self, nest: Nesting, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.nest, self.eps = nest, eps
        self.nest_dims = {"weight": (1,)}
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """x: (count, B, T, width); statistics in float32 for bf16 safety."""
        scale = take_cached(self, "weight", level)[:, None, None, :]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + scale.float())).type_as(x)
