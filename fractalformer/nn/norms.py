"""RMSNorm with a zero-initialised ``(1 + w)`` scale, as the seed FractalFormer."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalise by the root mean square; statistics in float32 for bf16 safety."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)
