"""FractalFormer: a GPT whose every weight is block-nested over levels.

At level ``l`` there are ``split**l`` sub-models of width ``d_model / split**l``; sub-model
``(l, j)`` owns block ``j`` of every dimension (embedding columns, norm scales, each
head's dims or a block of whole heads, MLP inner width, tied output) and lies inside its
parent ``(l - 1, j // split)``. The body is :class:`GPT` with block nesting: every step
runs every sub-model of every level, each level as one batched computation.

What this file adds is the seed's cross-level residuals, applied after every layer with
the states from before the exchange:

* ``upstream``: each parent adds its children's states, concatenated (the children's
  blocks tile the parent's dims, so the concatenation is parent-shaped);
* ``downstream``: each child adds its chunk of the parent's state.

With ``residual_rank > 0`` the added state goes through a learned low-rank map
(``up(down(x))``, ``up`` zero-initialised, so training starts with nothing added).

Extractability: with ``upstream`` a sub-model depends on its descendants, so only the
deepest level stays a standalone dense model; with ``downstream`` it depends on its
ancestors, so only level 0 does. Without residuals every sub-model does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .gpt import GPT


class LowRank(nn.Module):
    """``x -> up(down(x))`` of rank ``r``, one map per layer and level pair."""

    def __init__(self, dim: int, rank: int, std: float) -> None:
        super().__init__()
        self.lora_down = nn.Parameter(torch.randn(rank, dim) * std)
        self.lora_up = nn.Parameter(torch.zeros(dim, rank))  # starts by adding nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_down.T) @ self.lora_up.T


class FractalFormer(GPT):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.maps = None
        if cfg.residual != "none" and cfg.residual_rank > 0:
            # upstream maps act on the parent-shaped children state, downstream maps on the
            # parent state: either way a level-l-wide vector for the pair (l, l + 1)
            widths = [cfg.d_model // cfg.split**lv for lv in range(cfg.levels - 1)]
            self.maps = nn.ModuleList(
                nn.ModuleList(LowRank(w, cfg.residual_rank, cfg.init_std) for w in widths)
                for _ in range(cfg.n_layer)
            )

    def extractable(self, level: int) -> bool:
        r = self.config.residual
        if r == "upstream":
            return level == self.nest.levels - 1
        if r == "downstream":
            return level == 0
        return True

    def needed_levels(self, level: int) -> list[int]:
        r = self.config.residual
        if r == "upstream":
            return list(range(level, self.nest.levels))
        if r == "downstream":
            return list(range(level + 1))
        return [level]

    def exchange(self, states: dict[int, torch.Tensor], layer: int) -> dict[int, torch.Tensor]:
        r = self.config.residual
        if r == "none":
            return states
        s = self.nest.split
        out = dict(states)
        for lv in range(self.nest.levels - 1):
            if lv not in states or lv + 1 not in states:
                continue
            parent, child = states[lv], states[lv + 1]
            n, b, t, w = parent.shape
            if r == "upstream":  # (n*s, B, T, w/s) -> (n, B, T, w): children tile the parent
                add = child.view(n, s, b, t, w // s).permute(0, 2, 3, 1, 4).reshape(n, b, t, w)
                out[lv] = parent + (self.maps[layer][lv](add) if self.maps else add)
            else:  # downstream: the parent's chunk c goes to child c
                src = self.maps[layer][lv](parent) if self.maps else parent
                add = src.view(n, b, t, s, w // s).permute(0, 3, 1, 2, 4).reshape(n * s, b, t, w // s)
                out[lv + 1] = child + add
        return out
