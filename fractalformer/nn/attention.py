"""Causal self-attention with grouped-query heads, RoPE, nesting and a preallocated KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear
from .nesting import Nesting
from .rope import Rotary

# scaled_dot_product_attention shares key/value heads among query heads itself from torch 2.5
NATIVE_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class KVCache:
    """Keys and values of every layer in ``max_len`` preallocated slots, addressed by position.

    ``length`` is the number of valid positions. A forward of ``t`` new entries writes
    them at positions ``length .. length + t - 1`` (:meth:`where`, :meth:`update`) and
    attends over all ``max_len`` slots through a mask "key position <= query position"
    (gpt-fast's cache): the shapes of a decode step do not depend on ``length``, and
    rolling back (rejected speculative tokens) is "do not advance": ``cache.length = n``;
    slots past it are masked until they are overwritten. ``length`` may also be a tensor
    with one length per row, so that rows at different positions (the requests a server
    decodes together) share one forward; each row then sees its own positions only.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.slots = torch.arange(max_len, device=device)
        self.length: int | torch.Tensor = 0
        self._where: tuple[object, int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def reset(self) -> None:
        """Forget every position (the sampler's sliding window starts over)."""
        self.length = 0

    def longest(self) -> int:
        """The largest number of valid positions of any row."""
        return self.length if isinstance(self.length, int) else int(self.length.max())

    def rows(self, groups: int, n: int) -> KVCache:
        """The first ``n`` rows of each of ``groups`` equal blocks of rows, sharing this
        cache's memory (its ``length`` is its own). One group, or one row per group."""
        if groups > 1 and n > 1:
            raise ValueError("a view of several rows exists for one group only")
        view = KVCache.__new__(KVCache)
        view.k, view.v = (kv.unflatten(1, (groups, -1))[:, :, :n].flatten(1, 2) for kv in (self.k, self.v))
        view.max_len, view.slots, view.length, view._where = self.max_len, self.slots, self.length, None
        return view

    def where(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the next ``t`` entries, (t,) or per row (rows, t), and the additive
        mask of the slots each may read, (t, max_len) or (rows, 1, t, max_len). Computed
        once per forward (every layer asks)."""
        length, hit = self.length, self._where
        compiling = torch.compiler.is_compiling()  # a compiled step computes it once itself
        same = hit is not None and (hit[0] is length or (isinstance(length, int) and hit[0] == length))
        if same and hit[1] == t and not compiling:
            return hit[2]
        device = self.k.device
        if self.longest() + t > self.max_len:
            raise ValueError(f"KV cache overflow: {self.longest() + t} > {self.max_len} positions")
        if isinstance(length, int):
            pos = torch.arange(length, length + t, device=device)
        else:
            pos = length[:, None] + torch.arange(t, device=device)
        # additive (0 / -inf) rather than boolean: SDPA converts a boolean mask in every layer
        mask = torch.where(self.slots > pos[..., None], float("-inf"), 0.0)
        if mask.dtype != self.k.dtype:
            mask = mask.to(self.k.dtype)
        found = (pos, mask if pos.dim() == 1 else mask[:, None])
        if not compiling:
            self._where = (length, t, found)
        return found

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (rows, heads, t, head_dim) at positions ``pos`` from :meth:`where`;
        return every slot of the layer (the caller masks with :meth:`where`'s mask)."""
        ck, cv = self.k[layer], self.v[layer]  # fresh views: autograd may be tracing the writes
        if k.dtype != ck.dtype:  # autocast may hand lower precision
            k, v = k.to(ck.dtype), v.to(cv.dtype)
        if pos.dim() == 1:
            ck.index_copy_(2, pos, k)
            cv.index_copy_(2, pos, v)
        else:  # row r writes at its own positions
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            ck[rows, :, pos] = k.transpose(1, 2)
            cv[rows, :, pos] = v.transpose(1, 2)
        return ck, cv


class Attention(nn.Module):
    """Grouped-query attention whose heads nest in one of two ways.

    ``by_heads=False`` (the seed, "head_dim" nesting): every sub-model keeps all heads and
    owns a sub-block of each head's dims. ``by_heads=True`` ("heads" nesting): sub-model
    ``j`` owns block ``j`` of whole heads, query and key/value alike.
    """

    def __init__(self, nest: Nesting, d_model: int, n_head: int, n_kv_head: int, head_dim: int,
                 rotaries: list[Rotary], dropout: float, by_heads: bool = False) -> None:
        super().__init__()
        self.nest, self.by_heads = nest, by_heads
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        # q, k and v in one weight: segments are the parts (by_heads: sub-model j takes head
        # block j of each part) or every single head (each head nests inside itself)
        q_size, kv_size = n_head * head_dim, n_kv_head * head_dim
        segments = (q_size, kv_size, kv_size) if by_heads else n_head + 2 * n_kv_head
        self.qkv = Linear(nest, d_model, q_size + 2 * kv_size, False, out_groups=segments)
        self.o = Linear(nest, q_size, d_model, False, in_groups=1 if by_heads else n_head)
        self.rotaries = rotaries  # one table per level, owned (and moved) by the model
        self.dropout = dropout
        self.window = 0  # > 0: each query attends to the last `window` positions only (itself included)

    def shape(self, level: int) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim) of one sub-model of ``level``."""
        f = self.nest.split**level
        if self.by_heads:
            return self.n_head // f, self.n_kv_head // f, self.head_dim
        return self.n_head, self.n_kv_head, self.head_dim // f

    def forward(self, x: torch.Tensor, level: int, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """x: (count, B, T, width) -> (count, B, T, width); sub-models ride in the batch."""
        n, b, t, _ = x.shape
        hq, hkv, hd = self.shape(level)
        qkv = self.qkv(x, level).reshape(n * b, t, hq + 2 * hkv, hd)
        pos, mask = cache.where(t) if cache is not None else (0, None)
        start = cache.length if cache is not None else 0
        at = start if isinstance(start, int) else pos  # an int: the tables are sliced, not gathered
        # split, not sliced: the backward of a split is one concatenation, that of a slice a
        # zero-filled copy per piece
        qk, v = qkv.split((hq + hkv, hkv), dim=2)
        q, k = self.rotaries[level].at(qk, at).transpose(1, 2).split((hq, hkv), dim=1)  # q, k in one pass
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v, pos)
        gqa = hkv != hq and NATIVE_GQA  # no copy of the cached keys/values per step
        if hkv != hq and not gqa:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        extra = {"enable_gqa": True} if gqa else {}
        dropout = self.dropout if self.training else 0.0
        if self.window and isinstance(start, int) and start + t > self.window:
            y = local_attention(q, k, v, start, self.window, dropout, extra)  # slots are positions
            return self.o(y.transpose(1, 2).reshape(n, b, t, hq * hd), level)
        if self.window and mask is not None and pos.dim() == 2:  # per-row positions: their own window
            slots = torch.arange(mask.shape[-1], device=x.device)
            mask = mask.masked_fill(slots <= (pos - self.window)[:, None, :, None], float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                           **extra)
        return self.o(y.transpose(1, 2).reshape(n, b, t, hq * hd), level)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int,
                    dropout: float, extra: dict[str, bool]) -> torch.Tensor:
    """Causal attention over the last ``window`` positions, in chunks of ``window`` queries.

    q: (N, h, t, d) at positions ``start ..``; k, v: (N, hkv, >= start + t, d), slot = position.
    A chunk reads at most ``2 * window - 1`` keys, so the cost grows linearly with the
    sequence (a sliding window), not with its square.
    """
    t, out = q.shape[-2], []
    for a in range(0, t, window):
        b = min(a + window, t)
        lo, hi = max(0, start + a - window + 1), start + b
        pos_q = torch.arange(start + a, hi, device=q.device)[:, None]
        pos_k = torch.arange(lo, hi, device=q.device)[None, :]
        mask = (pos_k <= pos_q) & (pos_k > pos_q - window)
        out.append(F.scaled_dot_product_attention(q[..., a:b, :], k[..., lo:hi, :], v[..., lo:hi, :],
                                                  attn_mask=mask, dropout_p=dropout, **extra))
    return torch.cat(out, -2)
