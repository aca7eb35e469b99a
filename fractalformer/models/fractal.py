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

**Mix'n'Match** (:meth:`FractalFormer.mix_forward`, :meth:`FractalFormer.extract_mix`): a
model between the trained sizes that runs each layer's attention and MLP at a level of its
own on the full-width residual stream. A part at level ``l`` keeps only its level-``l``
block diagonal: the stream is cut into the level's ``split**l`` blocks and each block goes
through its sub-model's slice of the part (one batched computation), so the part costs
``1 / split**l`` of the full one. Embedding and norms stay the full model's; the output
reads the stream as the level ``L`` of the last layer's MLP does, as the mean of that
level's ``split**L`` sub-models' logits (their ensemble, a renormalised product of
experts): the tied output divided by ``split**L``. So a mix is a dense GPT of the full shape
whose off-diagonal blocks are zero and whose final norm scale is divided by ``split**L``
(its extraction).

Extractability: with ``upstream`` a sub-model depends on its descendants, so only the
deepest level stays a standalone dense model; with ``downstream`` it depends on its
ancestors, so only level 0 does. Without residuals every sub-model does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..config import ModelConfig, NestingConfig
from ..errors import FractalError
from ..nn import Linear, Nesting
from ..nn.nesting import nested_parameters
from .gpt import GPT

Mix = tuple[tuple[int, int], ...]  # per layer: (attention level, MLP level)


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

    # -- Mix'n'Match ----------------------------------------------------------------------------
    def parse_mix(self, spec: str | Sequence[int | tuple[int, int]]) -> Mix:
        """``"0,1,1,2"`` (one level per layer, both parts) or ``"0,1:2,..."`` (attention:MLP per
        layer), or the same as a sequence; checked against this model."""
        c = self.config
        if c.nesting.residual != "none":
            raise FractalError(f"--mix needs a FractalFormer without cross-level residuals (this one has "
                               f"residual={c.nesting.residual}: a level reads the others' states)")
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        if len(items) != c.n_layer:
            raise FractalError(f"--mix needs one level per layer ({c.n_layer} layers), got {len(items)}: "
                               f"{spec!r}")
        mix = []
        for item in items:
            try:
                parts = tuple(int(v) for v in item.split(":")) if isinstance(item, str) else \
                    (tuple(item) if isinstance(item, tuple) else (int(item),))
            except ValueError:
                raise FractalError(f"--mix entries are levels (A or A:M), got {item!r}") from None
            if len(parts) not in (1, 2) or any(not 0 <= v < self.nest.levels for v in parts):
                raise FractalError(f"--mix entries are levels 0..{self.nest.levels - 1} (A or A:M), "
                                   f"got {item!r}")
            mix.append((parts[0], parts[-1]))
        if c.nesting.attn_nesting != "heads" and any(a for a, _ in mix):
            raise FractalError("mixing attention levels needs attn_nesting=heads (with head_dim nesting a "
                               "level's heads are narrower heads, not blocks of the full model's)")
        return tuple(mix)

    def _part_level(self, name: str, mix: Mix) -> int:
        """The level of the part a parameter belongs to under ``mix`` (0 outside the blocks' parts)."""
        parts = name.split(".")
        if parts[0] != "blocks" or parts[2] not in ("attn", "mlp"):
            return 0
        return mix[int(parts[1])][0 if parts[2] == "attn" else 1]

    def mix_params(self, mix: Mix) -> int:
        """Parameters the mix uses: each part's level-``l`` block diagonal, the rest whole."""
        total = 0
        for name, p, dims in nested_parameters(self):
            lv = self._part_level(name, mix)
            total += self.nest.count(lv) * self.nest.take(p.detach(), lv, dims)[0].numel()
        return total

    def _blockwise(self, fn: Callable[[torch.Tensor, int], torch.Tensor], h: torch.Tensor, level: int
                   ) -> torch.Tensor:
        """``fn`` at ``level`` on the full-width state ``h`` (1, B, T, D): the level's blocks of
        the stream, each through its sub-model, concatenated back."""
        if level == 0:
            return fn(h, 0)
        n = self.nest.count(level)
        _, b, t, d = h.shape
        out = fn(h[0].view(b, t, n, d // n).permute(2, 0, 1, 3), level)
        return out.permute(1, 2, 0, 3).reshape(1, b, t, d)

    def mix_forward(self, idx: torch.Tensor, mix: Mix) -> dict[int, torch.Tensor]:
        """Logits of the Mix'n'Match model ``mix`` on ``idx`` (B, T): {0: (1, B, T, vocab)}."""
        if idx.shape[-1] > self.config.block_size:
            raise ValueError(f"sequence of {idx.shape[-1]} tokens exceeds block_size "
                             f"{self.config.block_size}")
        x = self.drop(self.embed(idx, 0))
        for i, ((a, m), block) in enumerate(zip(mix, self.blocks, strict=True)):
            attn = self._blockwise(lambda h, lv, blk=block, i=i: blk.attn(h, lv, None, i),
                                   block.attn_norm(x, 0), a)
            x = x + block.drop(attn)
            x = x + block.drop(self._blockwise(block.mlp, block.mlp_norm(x, 0), m))
        return {0: self.head({0: x})[0] / self.nest.count(mix[-1][1])}

    def extract_mix(self, mix: Mix) -> GPT:
        """The mix as a dense GPT of the full shape: every part at level ``l`` keeps its
        level-``l`` block diagonal, the other entries zero."""
        model = fold_glue(self)
        dense = GPT(self.config.replace(family="gpt", nesting=NestingConfig())).to(self.embed.weight.dtype)
        state = {}
        for name, p, dims in nested_parameters(model):
            lv = self._part_level(name, mix)
            w = p.detach().clone()
            if lv:
                w.zero_()
                self.nest.put(w, lv, dims, self.nest.take(p.detach(), lv, dims))
            state[name] = w
        with torch.no_grad():  # the output as the mean of the last level's sub-models' logits
            state["norm.weight"] = (1.0 + state["norm.weight"]) / self.nest.count(mix[-1][1]) - 1.0
        dense.load_state_dict(state)
        return dense.to(self.embed.weight.device).train(self.training)

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
