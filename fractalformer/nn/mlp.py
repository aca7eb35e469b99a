"""GeGLU feed-forward ``down(gelu(gate(x)) * up(x))``; the inner width nests too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decode import linear
from .linear import Linear
from .nesting import Nesting


class GeGLU(nn.Module):
    """Gate and up projections are fused in one weight of two segments (one matmul)."""

    def __init__(self, nest: Nesting, d_model: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.gate_up = Linear(nest, d_model, 2 * hidden, bias, out_groups=2)
        self.down = Linear(nest, hidden, d_model, bias)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        if level == 0 and not self.gate_up._forward_hooks:  # (a merged model's glue hooks the layer)
            # two products with the weight's halves: no activation-sized split and concatenation
            w, b = self.gate_up.weight.chunk(2), self.gate_up.bias  # chunked: a slice's backward zero-fills
            bias = (None, None) if b is None else b.chunk(2)
            gate, up = linear(x, w[0], bias[0]), linear(x, w[1], bias[1])
        else:
            gate, up = self.gate_up(x, level).chunk(2, dim=-1)
        return self.down(F.gelu(gate, approximate="tanh") * up, level)
