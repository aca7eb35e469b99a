"""Product-key retrieval and the sparse layers built on it: PEER and PKM.

Product keys (Lample et al. 2019) find the top-k of ``N = n**2`` keys while scoring only
``2 n`` of them: the query is cut in two halves, each half is scored against its own table
of ``n`` sub-keys, and key ``i * n + j`` scores ``s1[i] + s2[j]``. The exact top-k of all
``N`` sums lies among the ``k * k`` sums of the two halves' top-k (a sum outside them is
beaten by ``k`` sums inside), so retrieval is exact at ``O(n)`` cost.

* :class:`PEER` (He 2024, "Mixture of A Million Experts"): every key is a single-neuron
  expert ``act(u_i . x) v_i``; ``h`` heads retrieve ``k`` experts each and the output is
  the gate-weighted sum. The dot products ``u_i . x`` are a sampled matrix product (only
  the selected entries of ``x @ U.T``); the down vectors are read with
  ``F.embedding_bag`` and per-sample weights. No (tokens, h*k, d) tensor is ever built.
* :class:`PKM`: the same retrieval over a table of values, read out with one bag.

The query is normalised per token (RMSNorm or LayerNorm over each head's query).
BatchNorm, which PEER used, mixes positions and sequences and would break causality.

Against expert collapse (docs/moe.md): an output gate ``silu(W x)`` (Memory+), a usage
loss on each row's sub-key distribution (:func:`usage_kl`), and sub-keys that no
selection used re-drawn next to used ones (:meth:`ProductKeys.rekey`); the model can
also share one table between layers.

Expert and value tables are marked ``table = True`` so the optimizer can give them their
own group (own lr, no weight decay) or a row-sparse optimizer (``sparse=True`` makes
their gradients sparse: only the rows a batch selected).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .norms import widen

Gate = Literal["softmax", "sigmoid", "relu"]
QueryNorm = Literal["rms", "layer", "none"]


def mark_table(p: nn.Parameter) -> nn.Parameter:
    p.table = True  # read by the optimizer: own parameter group, optionally row-sparse
    return p


def is_table(p: torch.Tensor) -> bool:
    return bool(getattr(p, "table", False))


class ProductKeys(nn.Module):
    """Query network and product-key top-k: ``x -> (scores, indices)`` of shape (..., h, k)."""

    def __init__(self, d_in: int, n_keys: int, heads: int, topk: int, key_dim: int,
                 query_norm: QueryNorm = "rms", eps: float = 1e-6, usage: bool = False,
                 count: bool = False) -> None:
        super().__init__()
        n = math.isqrt(n_keys)
        if n * n != n_keys:
            raise ValueError(f"the number of keys must be a perfect square, got {n_keys}")
        if not 1 <= topk <= n:
            raise ValueError(f"top-k must lie in 1..sqrt(N) = {n}, got {topk}")
        if key_dim % 2:
            raise ValueError(f"the key dimension must be even (two halves), got {key_dim}")
        self.n, self.heads, self.topk, self.key_dim = n, heads, topk, key_dim
        self.query = nn.Linear(d_in, heads * key_dim, bias=False)
        self.query_norm = query_norm
        self.q_norm_weight = nn.Parameter(torch.ones(key_dim)) if query_norm != "none" else None
        self.eps = eps
        # (2 halves, heads, n sub-keys, key_dim / 2)
        self.sub_keys = nn.Parameter(torch.empty(2, heads, n, key_dim // 2))
        self.usage = usage
        self.balance: torch.Tensor | None = None  # usage loss of the last training forward
        # selections per (half, head, sub-key) in training since the last rekey (count=True),
        # saved with the weights so that a resumed run re-draws what an unbroken one would
        self.register_buffer("used", torch.zeros(2, heads, n, dtype=torch.long) if count else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query.weight, std=1 / math.sqrt(self.query.in_features))
        # a unit-RMS query half against N(0, 1/dim) keys gives unit-variance scores
        nn.init.normal_(self.sub_keys, std=1 / math.sqrt(self.key_dim // 2))
        if self.q_norm_weight is not None:
            nn.init.ones_(self.q_norm_weight)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., heads, key_dim), normalised per token and head."""
        q = self.query(x).unflatten(-1, (self.heads, self.key_dim))
        if self.query_norm == "rms":
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + self.eps) * self.q_norm_weight
        elif self.query_norm == "layer":
            q = F.layer_norm(q, (self.key_dim,), self.q_norm_weight, None, self.eps)
        return q

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.queries(x)  # (..., h, dk)
        q1, q2 = q.chunk(2, dim=-1)
        s1 = torch.einsum("...hd,hnd->...hn", q1, self.sub_keys[0])
        s2 = torch.einsum("...hd,hnd->...hn", q2, self.sub_keys[1])
        k = self.topk
        with torch.no_grad():  # which keys: no gradient flows through the selection itself
            v1, i1 = top_k(s1, k)  # (..., h, k), sorted
            v2, i2 = top_k(s2, k)
            a, b = pairs(k, s1.device)  # the only pairs (a, b) of ranks that can reach the top k
            best = (v1[..., a] + v2[..., b]).topk(k, dim=-1).indices
            j1, j2 = i1.gather(-1, a[best]), i2.gather(-1, b[best])
        scores = s1.gather(-1, j1) + s2.gather(-1, j2)
        if self.training:
            self.balance = usage_kl(s1, s2) if self.usage else None
            if self.used is not None:
                for half, j in enumerate((j1, j2)):
                    per_head = j.detach().movedim(-2, 0).reshape(self.heads, -1)
                    self.used[half].scatter_add_(1, per_head, torch.ones_like(per_head))
        return scores, j1 * self.n + j2

    @torch.no_grad()
    def rekey(self, generator: torch.Generator, noise: float = 0.1) -> torch.Tensor:
        """Re-draw every sub-key no selection used since the last call as a copy of a used
        one of its head and half (drawn in proportion to use) plus ``noise`` times the init
        scale: the crowded key is split, the dead one moves to where queries are. Returns the
        (2, h, n) mask of re-drawn sub-keys and restarts the counts."""
        if self.used is None:
            raise ValueError("rekey needs the selection counts (count=True)")
        dead = self.used == 0
        flat_used, flat_dead = self.used.flatten(0, 1).double(), dead.flatten(0, 1)
        keys = self.sub_keys.data.flatten(0, 1)  # (2h, n, dk/2), a view
        std = 1 / math.sqrt(self.key_dim // 2)
        for r in range(keys.shape[0]):
            n_dead = int(flat_dead[r].sum())
            if not n_dead or n_dead == self.n:
                continue
            src = torch.multinomial(flat_used[r].cpu(), n_dead, replacement=True, generator=generator)
            fresh = torch.randn(n_dead, keys.shape[-1], generator=generator) * (noise * std)
            keys[r, flat_dead[r]] = keys[r, src.to(keys.device)] + fresh.to(keys)
        self.used.zero_()
        return dead


GROUP = 8  # scores per group in top_k's first pass


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k)`` over the last dim (sorted), exact and faster on CPU for ``n >> k``:
    the top k lie in the k groups of ``GROUP`` with the highest maxima (a score in any other
    group is beaten by those k maxima), so only ``k * GROUP`` candidates are ranked."""
    n = scores.shape[-1]
    if n % GROUP or n < 4 * k * GROUP:
        return scores.topk(k, dim=-1)
    groups = scores.unflatten(-1, (n // GROUP, GROUP)).amax(-1).topk(k, dim=-1).indices
    cand = (groups.unsqueeze(-1) * GROUP + torch.arange(GROUP, device=scores.device)).flatten(-2)
    v, j = scores.gather(-1, cand).topk(k, dim=-1)
    return v, cand.gather(-1, j)


_PAIRS: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def pairs(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks ``(a, b)`` (from 0) of the two halves' sorted top-k whose sum can be in the top k of
    all sums: ``(a + 1) * (b + 1) <= k``, since ``a' <= a, b' <= b`` give that many sums at
    least as high. About ``k ln k`` pairs instead of ``k * k``."""
    key = (k, str(device))
    if key not in _PAIRS:
        ab = [(a, b) for a in range(k) for b in range(k) if (a + 1) * (b + 1) <= k]
        t = torch.tensor(ab, device=device)
        _PAIRS[key] = (t[:, 0], t[:, 1])
    return _PAIRS[key]


def usage_kl(*scores: torch.Tensor) -> torch.Tensor:
    """Mean over rows, heads and halves of KL(row mean of softmax(scores) || uniform): zero
    when a row's queries spread over all sub-keys. Each (B, T, h, n) score tensor is averaged
    over its positions T, so a row's loss is its own whatever the number of processes."""
    out = []
    for s in scores:
        p = widen(s).softmax(-1)
        mean = p.mean(-3) if p.dim() >= 3 else p  # (B, h, n)
        out.append((mean * (mean * mean.shape[-1]).clamp_min(1e-30).log()).sum(-1).mean())
    return torch.stack(out).mean()


def gate(scores: torch.Tensor, kind: Gate) -> torch.Tensor:
    """Routing weights from retrieval scores, per head."""
    if kind == "softmax":
        return widen(scores).softmax(-1).type_as(scores)
    if kind == "sigmoid":
        return torch.sigmoid(scores)
    return F.relu(scores)


def bag(table: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[t, j] * table[idx[t, j]]`` without gathering the rows: (T, d)."""
    return F.embedding_bag(idx, table, mode="sum", per_sample_weights=weights.to(table.dtype))


_CHUNK_BYTES = 8 << 20  # gathered rows per chunk: small enough to be reused, not re-faulted


def _chunks(idx: torch.Tensor, d: int) -> list[slice]:
    step = max(1, _CHUNK_BYTES // (idx.shape[1] * d * idx.element_size()))
    return [slice(s, s + step) for s in range(0, idx.shape[0], step)]


def gather_dot(table: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``table[idx[t, j]] . x[t]`` for every (t, j): (T, m). In float32/64 a sampled matrix
    product (``x @ table.T`` at the selected entries only: no row is copied), else the rows
    are gathered chunk by chunk."""
    if table.dtype in (torch.float32, torch.float64) and x.dtype == table.dtype:
        t, m = idx.shape
        crow = torch.arange(0, t * m + 1, m, device=idx.device)
        with warnings.catch_warnings():  # torch calls its CSR tensors beta on their first use
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), x.new_zeros(t * m),
                                              (t, table.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, x, table.t(), beta=0.0).values().view(t, m)
    out = x.new_empty(idx.shape)
    for c in _chunks(idx, table.shape[1]):
        rows = table.index_select(0, idx[c].reshape(-1)).view(*idx[c].shape, -1)
        out[c] = torch.bmm(rows, x[c].unsqueeze(-1)).squeeze(-1)
    return out


def table_grad(idx: torch.Tensor, coef: torch.Tensor, src: torch.Tensor, n_rows: int,
               sparse: bool) -> torch.Tensor:
    """Gradient of a table read as ``sum_j coef[t, j] * table[idx[t, j]]`` given ``src = dL/dout``
    (or the input, for the up vectors): row ``i`` gets ``sum coef[t, j] src[t]`` over its uses.

    Dense: an (N, d) tensor. Sparse: a coalesced COO tensor holding only the used rows.
    """
    d = src.shape[1]
    if sparse:
        used, inverse = idx.unique(return_inverse=True)
        rows = src.new_zeros(used.numel(), d)
    else:
        used, inverse = None, idx
        rows = src.new_zeros(n_rows, d)
    for c in _chunks(idx, d):
        terms = (coef[c].unsqueeze(-1) * src[c].unsqueeze(1)).flatten(0, 1)
        rows.index_add_(0, inverse[c].reshape(-1), terms)
    if used is None:
        return rows
    return torch.sparse_coo_tensor(used.unsqueeze(0), rows, (n_rows, d), is_coalesced=True,
                                   check_invariants=False)


class _Experts(torch.autograd.Function):
    """Single-neuron experts ``out[t] = sum_j g[t, j] gelu(up[i] . x[t]) down[i]``, ``i = idx[t, j]``.

    Written by hand so that neither pass materialises a (T, m, d) tensor of rows: the
    forward gathers up-vectors in small chunks for the dot products and reads the down
    vectors with a bag; the backward reads the up vectors with a bag (dL/dx) and
    accumulates the tables' gradients chunk by chunk (dense, or sparse rows).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor, sparse: bool) -> torch.Tensor:
        s = gather_dot(up, idx, x)
        a = F.gelu(s, approximate="tanh")
        ctx.save_for_backward(x, idx, g, up, down, s)
        ctx.sparse = sparse
        return bag(down, idx, g * a)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, idx, g, up, down, s = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        a = F.gelu(s, approximate="tanh")
        grad_w = gather_dot(down, idx, grad_out)  # dL/d(g * a)
        grad_s = torch.ops.aten.gelu_backward(grad_w * g, s, approximate="tanh")
        grad_x = bag(up, idx, grad_s) if ctx.needs_input_grad[0] else None
        grad_up = table_grad(idx, grad_s, x, up.shape[0], ctx.sparse) if ctx.needs_input_grad[3] else None
        grad_down = (table_grad(idx, g * a, grad_out, down.shape[0], ctx.sparse)
                     if ctx.needs_input_grad[4] else None)
        return grad_x, None, grad_w * a, grad_up, grad_down, None


class _Read(torch.autograd.Function):
    """``out[t] = sum_j g[t, j] table[idx[t, j]]`` (the PKM read-out) with the same hand-written
    backward as :class:`_Experts`: the bag's own backward sorts every index (slow on CPU)."""

    @staticmethod
    def forward(ctx: Any, idx: torch.Tensor, g: torch.Tensor, table: torch.Tensor, sparse: bool
                ) -> torch.Tensor:
        ctx.save_for_backward(idx, g, table)
        ctx.sparse = sparse
        return bag(table, idx, g)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        idx, g, table = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_g = gather_dot(table, idx, grad_out) if ctx.needs_input_grad[1] else None
        grad_table = (table_grad(idx, g, grad_out, table.shape[0], ctx.sparse)
                      if ctx.needs_input_grad[2] else None)
        return None, grad_g, grad_table, None


def read(idx: torch.Tensor, g: torch.Tensor, table: torch.Tensor, sparse: bool = False) -> torch.Tensor:
    """(T, m) indices and weights -> (T, d) weighted sums of table rows."""
    return _Read.apply(idx.contiguous(), g.to(table.dtype).contiguous(), table, sparse)


def experts(x: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
            sparse: bool = False) -> torch.Tensor:
    """(T, d) tokens through their selected single-neuron experts (T, m) -> (T, d)."""
    dtype = up.dtype
    return _Experts.apply(x.to(dtype).contiguous(), idx.contiguous(), g.to(dtype).contiguous(), up, down,
                          sparse)


class SparseStats:
    """Counts on the validation split: how often each expert was picked and its gate mass."""

    def __init__(self, n_keys: int, device: torch.device | str) -> None:
        self.hits = torch.zeros(n_keys, dtype=torch.long, device=device)
        self.mass = torch.zeros(n_keys, dtype=torch.float64, device=device)

    def add(self, idx: torch.Tensor, weights: torch.Tensor) -> None:
        flat = idx.reshape(-1)
        self.hits += torch.bincount(flat, minlength=self.hits.numel())
        self.mass.index_add_(0, flat, weights.detach().reshape(-1).to(torch.float64).abs())


class _Retrieval(nn.Module):
    """What PEER and PKM share: product keys, the gate, the sparse-gradient switch, counts."""

    def __init__(self, d_model: int, n_keys: int, heads: int, topk: int, key_dim: int, gate: Gate,
                 query_norm: QueryNorm, sparse: bool, out_std: float, gated: bool = False,
                 usage: bool = False, count: bool = False) -> None:
        super().__init__()
        self.keys = ProductKeys(d_model, n_keys, heads, topk, key_dim, query_norm, usage=usage, count=count)
        self.gate_kind, self.sparse, self.out_std = gate, sparse, out_std
        # Memory+ (Memory Layers at Scale): the output times silu(W x), per token
        self.out_gate = nn.Linear(d_model, d_model, bias=False) if gated else None
        self.stats: SparseStats | None = None  # set by the model to count usage

    def reset_parameters(self) -> None:
        self.keys.reset_parameters()
        if self.out_gate is not None:
            nn.init.normal_(self.out_gate.weight, std=1 / math.sqrt(self.out_gate.in_features))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing of (..., d): indices and gate weights, both (tokens, h*k). Leading dims
        (B, T) let the usage loss take each row on its own."""
        scores, idx = self.keys(x)
        idx, g = idx.flatten(-2).flatten(0, -2), gate(scores, self.gate_kind).flatten(-2).flatten(0, -2)
        if self.stats is not None:
            self.stats.add(idx, g)
        return idx, g

    def output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output for input ``x`` (..., d) from the read-out ``out`` (tokens, d)."""
        out = out.view(x.shape).type_as(x)
        return out if self.out_gate is None else out * F.silu(self.out_gate(x))


class PEER(_Retrieval):
    """Parameter-efficient expert retrieval: ``sum_h sum_k g_hk act(u_i . x) v_i``.

    ``forward`` takes (..., d_model) and returns (..., d_model); every token is routed on
    its own (no statistics across positions or sequences), so the layer is causal.
    """

    def __init__(self, d_model: int, n_experts: int, heads: int, topk: int, key_dim: int,
                 gate: Gate = "softmax", query_norm: QueryNorm = "rms", sparse: bool = False,
                 out_std: float = 0.02, gated: bool = False, usage: bool = False,
                 count: bool = False) -> None:
        super().__init__(d_model, n_experts, heads, topk, key_dim, gate, query_norm, sparse, out_std,
                         gated, usage, count)
        self.up = mark_table(nn.Parameter(torch.empty(n_experts, d_model)))
        self.down = mark_table(nn.Parameter(torch.empty(n_experts, d_model)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.up, std=1 / math.sqrt(self.up.shape[1]))  # u . x ~ N(0, 1) on normed x
        nn.init.normal_(self.down, std=self.out_std)

    def forward(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        idx, g = self.route(x)
        return self.output(x, experts(x.reshape(-1, x.shape[-1]), idx, g, self.up, self.down, self.sparse))


class PKM(_Retrieval):
    """Product-key memory: ``sum_h sum_k g_hk v_i`` over a value table."""

    def __init__(self, d_model: int, n_keys: int, heads: int, topk: int, key_dim: int,
                 gate: Gate = "softmax", query_norm: QueryNorm = "rms", sparse: bool = False,
                 out_std: float = 0.02, gated: bool = False, usage: bool = False,
                 count: bool = False) -> None:
        super().__init__(d_model, n_keys, heads, topk, key_dim, gate, query_norm, sparse, out_std,
                         gated, usage, count)
        self.values = mark_table(nn.Parameter(torch.empty(n_keys, d_model)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.values, std=self.out_std)

    def forward(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        idx, g = self.route(x)
        return self.output(x, read(idx, g, self.values, self.sparse))
