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

With ``glue_rank r > 0`` (model merging, ``fractalformer.growth``) every linear layer of
the full model also adds rank-r maps between its level-1 blocks: output block ``i`` gets
``up_ij(down_ij(x_j))`` from input block ``j != i``. They are the glue between merged
children; the sub-models never see them, and ``fold_glue`` adds ``up_ij @ down_ij`` into
the off-diagonal blocks of the weight afterwards, leaving a plain FractalFormer.

Extractability: with ``upstream`` a sub-model depends on its descendants, so only the
deepest level stays a standalone dense model; with ``downstream`` it depends on its
ancestors, so only level 0 does. Without residuals every sub-model does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..nn import Linear, Nesting
from .gpt import GPT


class LowRank(nn.Module):
    """``x -> up(down(x))`` of rank ``r``, one map per layer and level pair."""

    def __init__(self, dim: int, rank: int, std: float) -> None:
        super().__init__()
        self.lora_down = nn.Parameter(torch.randn(rank, dim) * std)
        self.lora_up = nn.Parameter(torch.zeros(dim, rank))  # starts by adding nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_down.T) @ self.lora_up.T


class Glue(nn.Module):
    """Rank-r maps between the level-1 blocks of one linear layer, added to its level-0 output.

    ``down[i, j]`` (r, in block) and ``up[i, j]`` (out block, r) carry input block ``j`` to
    output block ``i``; the diagonal pairs are masked out (the blocks of the children).
    ``up`` starts at zero, so the merged model starts as the children left it.
    """

    def __init__(self, nest: Nesting, linear: Linear, rank: int, std: float) -> None:
        super().__init__()
        k = nest.split
        out_groups, in_groups = linear.nest_dims["weight"]
        out_f, in_f = linear.weight.shape
        self.register_buffer("out_idx", nest.owned(out_f, 1, out_groups), persistent=False)  # (k, out/k)
        self.register_buffer("in_idx", nest.owned(in_f, 1, in_groups), persistent=False)
        self.register_buffer("off", (1 - torch.eye(k))[:, :, None, None], persistent=False)
        self.down = nn.Parameter(torch.randn(k, k, rank, in_f // k) * std)
        self.up = nn.Parameter(torch.zeros(k, k, out_f // k, rank))

    def delta(self) -> torch.Tensor:
        """(k, k, out block, in block): the weight blocks the maps amount to."""
        return (self.up * self.off) @ self.down

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (level-0 output of the layer for input ``x``) plus the glue."""
        k = self.in_idx.shape[0]
        xb = x[..., self.in_idx.flatten()].unflatten(-1, (k, -1))  # (..., k, in block)
        h = torch.einsum("...jc,ijrc->...ijr", xb, self.down)
        add = torch.einsum("...ijr,ijor->...io", h, self.up * self.off).flatten(-2)
        return y.index_add(-1, self.out_idx.flatten(), add.to(y.dtype))


class FractalFormer(GPT):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.glue = None
        if cfg.nesting.glue_rank:
            linears = {n: m for n, m in self.named_modules() if isinstance(m, Linear)}
            self.glue = nn.ModuleDict({n.replace(".", "_"): Glue(self.nest, m, cfg.nesting.glue_rank,
                                                                 cfg.init_std) for n, m in linears.items()})
            for n, m in linears.items():
                m.register_forward_hook(self._glue_hook(self.glue[n.replace(".", "_")]))
        self.maps = None
        if cfg.nesting.residual != "none" and cfg.nesting.residual_rank > 0:
            # upstream maps act on the parent-shaped children state, downstream maps on the
            # parent state: either way a level-l-wide vector for the pair (l, l + 1)
            widths = [cfg.d_model // cfg.nesting.split**lv for lv in range(cfg.nesting.levels - 1)]
            self.maps = nn.ModuleList(
                nn.ModuleList(LowRank(w, cfg.nesting.residual_rank, cfg.init_std) for w in widths)
                for _ in range(cfg.n_layer)
            )

    @staticmethod
    def _glue_hook(glue: Glue) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
        """A forward hook adding ``glue`` to a linear layer's level-0 output."""
        def hook(_: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor | None:
            x, level = args
            return glue(x, y) if level == 0 else None
        return hook

    def extract(self, level: int, index: int) -> GPT:
        """As :meth:`GPT.extract`; the full model (level 0) of a glued model includes its glue
        maps (folded into the weights), which the sub-models never see."""
        if self.glue is not None and level == 0:
            return fold_glue(self).extract(level, index)
        return super().extract(level, index)

    def extractable(self, level: int) -> bool:
        r = self.config.nesting.residual
        if r == "upstream":
            return level == self.nest.levels - 1
        if r == "downstream":
            return level == 0
        return True

    def needed_levels(self, level: int) -> list[int]:
        r = self.config.nesting.residual
        if r == "upstream":
            return list(range(level, self.nest.levels))
        if r == "downstream":
            return list(range(level + 1))
        return [level]

    def exchange(self, states: dict[int, torch.Tensor], layer: int) -> dict[int, torch.Tensor]:
        r = self.config.nesting.residual
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


def fold_glue(model: GPT) -> GPT:
    """The same function as a plain FractalFormer: every low-rank glue map added into the
    off-diagonal blocks of its weight (``glue_rank`` 0)."""
    if getattr(model, "glue", None) is None:
        return model
    plain = FractalFormer(model.config.replace(glue_rank=0)).to(model.embed.weight.device)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("glue.")})
    with torch.no_grad():
        for name, mod in plain.named_modules():
            key = name.replace(".", "_")  # the glue's key for this linear layer
            if key not in model.glue:
                continue
            glue = model.glue[key]
            k = glue.out_idx.shape[0]
            delta = glue.delta()
            for i in range(k):
                for j in range(k):
                    if i != j:
                        mod.weight[glue.out_idx[i][:, None], glue.in_idx[j][None, :]] += delta[i, j]
    return plain.train(model.training)
