"""Nested linear and embedding layers: full weights, sliced per level by the nesting.

Activations of a level carry a leading sub-model axis: shape (count, B, T, width). The
sub-models of a level multiply by their own blocks of the weight in one batched matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decode import linear, sliced
from .nesting import Nesting, Segments


class Linear(nn.Module):
    """``y = x W^T + b`` where each sub-model uses its own (out, in) block of ``W``.

    ``in_groups`` / ``out_groups`` give the segments (heads, fused parts) of the input /
    output dimension; nesting then happens inside each segment. ``nest_dims`` records
    this per parameter so extraction can slice any nested layer the same way.
    """

    def __init__(self, nest: Nesting, in_features: int, out_features: int, bias: bool,
                 in_groups: Segments = 1, out_groups: Segments = 1) -> None:
        super().__init__()
        self.nest = nest
        self.nest_dims = {"weight": (out_groups, in_groups), "bias": (out_groups,)}
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        if level == 0:
            return linear(x, self.weight, self.bias)
        n, b, t, _ = x.shape
        w = sliced(self, "weight", level, transpose=True)  # (n, in_l, out_l)
        x2 = x.reshape(n, b * t, -1)
        if self.bias is None:
            y = torch.bmm(x2, w)
        else:
            y = torch.baddbmm(sliced(self, "bias", level).unsqueeze(1), x2, w)
        return y.view(n, b, t, -1)


class Embedding(nn.Module):
    """Token embedding whose columns are nested; also serves as the tied output head."""

    def __init__(self, nest: Nesting, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.nest = nest
        self.nest_dims = {"weight": (0, 1)}  # the vocabulary axis is never nested
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, idx: torch.Tensor, level: int) -> torch.Tensor:
        """Token ids -> (count, B, T, width) embeddings of every sub-model of ``level``.

        ``idx`` is (B, T), read by every sub-model, or (count, B', T), one batch each.
        """
        full = F.embedding(idx, self.weight)
        if level == 0:
            return full if idx.dim() == 3 else full.unsqueeze(0)
        cols = self.nest.owned(self.weight.shape[1], level, 1, idx.device)  # (n, width)
        if idx.dim() == 2:
            return full[..., cols].movedim(-2, 0)
        return full.gather(-1, cols[:, None, None, :].expand(*full.shape[:-1], cols.shape[1]))

    def logits(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Tied output: (count, B, T, width) -> (count, B, T, vocab)."""
        if level == 0:
            return F.linear(x, self.weight)
        n, b, t, _ = x.shape
        w = sliced(self, "weight", level, transpose=True)  # (n, width, vocab)
        return torch.bmm(x.reshape(n, b * t, -1), w).view(n, b, t, -1)
