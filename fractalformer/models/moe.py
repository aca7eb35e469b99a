"""FractalMoE: the dense GPT with product-key sparse layers in place of the MLP.

``moe`` picks the layer that replaces the GeGLU of the blocks in ``moe_layers``:

* ``peer``: a million-expert layer (He 2024): single-neuron experts retrieved by
  product keys (``fractalformer.nn.product_keys.PEER``);
* ``pkm``: a product-key memory (Lample et al. 2019), for comparison;
* ``fhme``: the seed's fractal hyper-mixture: product keys route every token to ``h * k``
  *fractal experts*; expert ``i`` is a stack of ``fhme_depth`` single-neuron sub-blocks
  ``(u_i^d, v_i^d)`` applied one after another with a residual, and each token decides
  after every sub-block, from its own state, whether to go deeper (adaptive computation
  time, Graves 2016). Tokens that halt are dropped from the deeper sub-blocks (gather
  the continuing rows, compute, scatter back), so the saved compute is real.

Everything per token: no statistic mixes positions or sequences, so the model is as
causal as the attention, KV-cache generation is unchanged, and evaluation is
deterministic (ACT halts by thresholds, never by sampling).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import FractalError
from ..nn.norms import widen
from ..nn.product_keys import PEER, PKM, SparseStats, experts, is_table, mark_table
from .gpt import GPT

HALT_EPS = 0.01  # a token halts once its cumulative halting probability reaches 1 - eps


class FHME(nn.Module):
    """Product-key routing over fractal experts with per-token adaptive depth (ACT).

    With ``h_0 = x``, sub-block ``d`` computes ``h_d = h_{d-1} + sum_j g_j gelu(u^d_{i_j} .
    h_{d-1}) v^d_{i_j}`` for the token's routed experts ``i_j`` (routing once, from ``x``),
    then a halting unit gives ``p_d = sigmoid(w_d . h_d + b_d)``. A token stops at the first
    ``d`` whose cumulative ``p`` reaches ``1 - eps`` (or at the last sub-block); its output is
    ``sum_d w_d h_d - x`` with ``w_d = p_d`` before the stop and the remainder at it. The
    ponder cost ``(N + R) / depth`` (sub-blocks run plus remainder) is the compute penalty.
    """

    def __init__(self, cfg: ModelConfig, out_std: float) -> None:
        super().__init__()
        d, n, depth = cfg.d_model, cfg.moe.n_experts, cfg.moe.fhme_depth
        m = cfg.moe
        self.router = PEER(d, n, m.heads, m.topk, m.key_dim, m.gate, m.query_norm, m.sparse, out_std,
                           usage=m.usage_weight > 0, count=m.rekey_every > 0)
        # the router's own up/down tables are sub-block 0; deeper sub-blocks get their own
        self.up = nn.ParameterList(mark_table(nn.Parameter(torch.empty(n, d))) for _ in range(depth - 1))
        self.down = nn.ParameterList(mark_table(nn.Parameter(torch.empty(n, d))) for _ in range(depth - 1))
        self.halt = nn.Linear(d, depth - 1) if depth > 1 else None  # no decision after the last
        self.depth, self.adaptive, self.out_std = depth, cfg.moe.fhme_adaptive, out_std
        self.ponder: torch.Tensor | None = None  # mean (N + R) / depth of the last forward
        self.counts: list[int] | None = None  # [tokens, sub-block applications] when tracking
        self.last_depth: torch.Tensor | None = None  # sub-blocks each token of the last call ran
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        for u, v in zip(self.up, self.down, strict=True):
            nn.init.normal_(u, std=1 / math.sqrt(u.shape[1]))
            nn.init.normal_(v, std=self.out_std)
        if self.halt is not None:
            nn.init.zeros_(self.halt.weight)
            nn.init.constant_(self.halt.bias, -3.0)  # p ~ 0.05: every token starts at full depth

    def forward(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        shape = x.shape
        idx, g = self.router.route(x)  # counted by the router when usage is tracked
        x = x.reshape(-1, shape[-1])
        tables = [(self.router.up, self.router.down), *zip(self.up, self.down, strict=True)]
        sparse = self.router.sparse
        t = x.shape[0]
        if not self.adaptive:
            h = x
            for up, down in tables:
                h = h + experts(h, idx, g, up, down, sparse).type_as(h)
            self.ponder, ran = None, t * self.depth
            out = h - x
        else:
            out, ran = self._act(x, idx, g, tables, sparse)
        if self.counts is not None:
            self.counts[0] += t
            self.counts[1] += ran
        return out.view(shape)

    def _act(self, x: torch.Tensor, idx: torch.Tensor, g: torch.Tensor,
             tables: list[tuple[torch.Tensor, torch.Tensor]], sparse: bool) -> tuple[torch.Tensor, int]:
        t = x.shape[0]
        active = torch.arange(t, device=x.device)  # rows still going deeper
        h = x
        acc = torch.zeros_like(x)  # sum_d w_d h_d
        cum = x.new_zeros(t)  # cumulative halting probability of the active rows' past
        steps = x.new_zeros(t)  # N: sub-blocks run
        remainder = x.new_zeros(t)  # R
        ran = 0
        for d, (up, down) in enumerate(tables):
            ha = h[active] if d else h
            ha = ha + experts(ha, idx[active], g[active], up, down, sparse).type_as(ha)
            ran += active.numel()
            ca = cum[active]
            if d == self.depth - 1:  # the last sub-block takes whatever probability is left
                stop, w = torch.ones_like(ca, dtype=torch.bool), 1 - ca
            else:
                p = torch.sigmoid(widen(self.halt(ha)[:, d])).type_as(ha)
                stop = ca + p >= 1 - HALT_EPS
                w = torch.where(stop, 1 - ca, p)
            acc = acc.index_add(0, active, w.unsqueeze(-1) * ha)
            steps = steps.index_add(0, active, torch.ones_like(w))
            remainder = remainder.index_add(0, active[stop], (1 - ca)[stop])
            cum = cum.index_add(0, active, torch.where(stop, torch.zeros_like(w), w))
            h = h.index_copy(0, active, ha) if d else ha
            active = active[~stop]
            if active.numel() == 0:
                break
        self.ponder = ((steps + remainder) / self.depth).mean()
        self.last_depth = steps.detach()
        return acc - x, ran


def _sparse_layer(c: ModelConfig, out_std: float) -> nn.Module:
    m = c.moe
    if m.kind == "fhme":
        return FHME(c, out_std)
    layer = {"peer": PEER, "pkm": PKM}[m.kind]
    return layer(c.d_model, m.n_experts, m.heads, m.topk, m.key_dim, m.gate, m.query_norm, m.sparse,
                 out_std, gated=m.gated, usage=m.usage_weight > 0, count=m.rekey_every > 0)


def _share_tables(layers: list[nn.Module]) -> None:
    """``moe_shared``: every layer reads the first one's expert (value) table, tied as an
    embedding and its output head are; each keeps its own query, keys and gate."""
    for layer in layers[1:]:
        for name in ("up", "down") if isinstance(layer, PEER) else ("values",):
            setattr(layer, name, getattr(layers[0], name))


class WithMLP(nn.Module):
    """The dense MLP and a sparse layer side by side, outputs added."""

    def __init__(self, mlp: nn.Module, sparse: nn.Module) -> None:
        super().__init__()
        self.dense, self.sparse = mlp, sparse

    def forward(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        return self.dense(x, level) + self.sparse(x, level)


def usage_summary(hits: torch.Tensor, mass: torch.Tensor) -> dict[str, float]:
    """Expert usage of one layer from counts on the validation split.

    * ``expert_usage``: share of experts selected at least once;
    * ``expert_kl``: KL(q || uniform) in nats of the summed gate weights ``q`` (0 = even);
    * ``dead_experts``: share of experts holding under 1% of a uniform share of the gate
      mass (never or almost never used).
    """
    n = hits.numel()
    total = float(mass.sum())
    q = mass / total if total > 0 else torch.full_like(mass, 1.0 / n)
    nz = q[q > 0]
    kl = float((nz * (nz * n).log()).sum())
    dead = float((q < 0.01 / n).double().mean())
    return {"expert_usage": float((hits > 0).double().mean()), "expert_kl": kl, "dead_experts": dead}


class Usage:
    """Counts gathered while :meth:`MoEGPT.track_usage` is active, summarised per model.

    ``layers`` maps a layer index to its (selection counts, FHME [tokens, sub-blocks run]
    or None, FHME depth).
    """

    def __init__(self, layers: dict[int, tuple[SparseStats, list[int] | None, int]]) -> None:
        self.layers = layers

    def summary(self) -> dict[str, Any]:
        per_layer = {}
        for i, (st, counts, depth) in self.layers.items():
            row: dict[str, Any] = usage_summary(st.hits, st.mass)
            if counts is not None and counts[0]:
                tokens, ran = counts
                row |= {"mean_depth": ran / tokens, "compute_saved": 1 - ran / (tokens * depth)}
            per_layer[i] = row
        keys = next(iter(per_layer.values())).keys()
        out: dict[str, Any] = {k: sum(r[k] for r in per_layer.values()) / len(per_layer) for k in keys}
        return out | {"per_layer": {str(i): r for i, r in per_layer.items()}}

    def hits(self) -> dict[int, torch.Tensor]:
        return {i: st.hits for i, (st, _, _) in self.layers.items()}


class MoEGPT(GPT):
    """The GPT whose ``moe_layers`` hold a PEER, PKM or FHME layer instead of the GeGLU."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        if cfg.moe.shared:
            _share_tables(list(self.sparse_layers().values()))

    def make_mlp(self, layer: int) -> nn.Module:
        c = self.config
        if layer not in c.sparse_layers():
            return super().make_mlp(layer)
        sparse = _sparse_layer(c, c.init_std / math.sqrt(2 * c.n_layer))
        return WithMLP(super().make_mlp(layer), sparse) if c.moe.with_mlp else sparse

    def sparse_layers(self) -> dict[int, nn.Module]:
        """Layer index -> its sparse module (PEER, PKM or FHME)."""
        out = {}
        for i in self.config.sparse_layers():
            m = self.blocks[i].mlp
            out[i] = m.sparse if isinstance(m, WithMLP) else m
        return out

    def routers(self) -> dict[int, PEER | PKM]:
        """Layer index -> the module that routes its tokens (an FHME layer's router)."""
        return {i: m.router if isinstance(m, FHME) else m for i, m in self.sparse_layers().items()}

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for m in self.sparse_layers().values():
            m.reset_parameters()  # product keys and expert tables have their own scales

    @contextlib.contextmanager
    def track_usage(self) -> Iterator[Usage]:
        """Count expert selections, gate mass and (FHME) sub-blocks run inside the block."""
        layers, routers = self.sparse_layers(), self.routers()
        device = self.embed.weight.device
        tracked = {}
        for i, m in layers.items():
            stats = SparseStats(self.config.moe.n_experts, device)
            counts = [0, 0] if isinstance(m, FHME) else None
            routers[i].stats = stats
            if isinstance(m, FHME):
                m.counts = counts
            tracked[i] = (stats, counts, getattr(m, "depth", 1))
        try:
            yield Usage(tracked)
        finally:
            for i, m in layers.items():
                routers[i].stats = None
                if isinstance(m, FHME):
                    m.counts = None

    def active_params(self, mean_depth: float | None = None) -> int:
        """Parameters one token uses: all but the tables, plus the rows it selects
        (``h * k`` experts of two vectors, or values of one, per sub-block run)."""
        c = self.config
        tables = sum(p.numel() for p in self.parameters() if is_table(p))
        per_row = {"peer": 2, "pkm": 1, "fhme": 2}[c.moe.kind] * c.d_model
        depth = (mean_depth or c.moe.fhme_depth) if c.moe.kind == "fhme" else 1
        used = len(self.sparse_layers()) * c.moe.heads * c.moe.topk * per_row * depth
        return self.num_params() - tables + round(used)

    def sub_model_config(self, level: int) -> ModelConfig:
        self.nest.check(level)
        return self.config

    def extractable(self, level: int) -> bool:
        return False  # not nested: the run folder already holds the only model

    def extract(self, level: int, index: int) -> GPT:
        raise FractalError("family moe is not nested: its run folder already holds the only model")
