"""Causal self-attention with grouped-query heads, RoPE and a preallocated KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rope import Rotary


class KVCache:
    """Keys and values of every layer for positions ``0 .. length - 1``.

    Preallocated to ``max_len``; ``length`` is the number of valid positions, so rolling
    back (for example after rejected speculative tokens) is ``cache.length = n``.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values at ``length ..`` and return all valid ones."""
        end = self.length + k.shape[-2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len} positions")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    """Multi-head attention where ``n_kv_head`` key/value heads are shared by query groups."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, head_dim: int,
                 rotary: Rotary, dropout: float) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.q = nn.Linear(d_model, n_head * head_dim, bias=False)
        self.k = nn.Linear(d_model, n_kv_head * head_dim, bias=False)
        self.v = nn.Linear(d_model, n_kv_head * head_dim, bias=False)
        self.o = nn.Linear(n_head * head_dim, d_model, bias=False)
        self.rotary = rotary
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        start = cache.length if cache is not None else 0
        q = self.q(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask, causal = None, True
        if start > 0:  # queries at start.. attend to every cached key up to their position
            causal = False
            if t > 1:
                pos_q = torch.arange(start, start + t, device=x.device)
                mask = torch.arange(start + t, device=x.device)[None, :] <= pos_q[:, None]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))
