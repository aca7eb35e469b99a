"""GeGLU feed-forward ``down(gelu(gate(x)) * up(x))``; the inner width nests too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear
from .nesting import Nesting


class GeGLU(nn.Module):
    def __init__(self, nest: Nesting, d_model: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.gate = Linear(nest, d_model, hidden, bias)
        self.up = Linear(nest, d_model, hidden, bias)
        self.down = Linear(nest, hidden, d_model, bias)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        h = F.gelu(self.gate(x, level), approximate="tanh") * self.up(x, level)
        return self.down(h, level)
