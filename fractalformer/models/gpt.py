"""The dense GPT: the reference model every nested model is compared with.

Pre-norm decoder blocks (RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> GeGLU -> residual), a final RMSNorm and an output head tied to the token
embedding. With the embedding initialised at std 0.02 the initial logits are small,
so the untrained loss is ln(vocab_size) - unlike the seed, whose row-normalised
output gave an initial loss of ~73.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..nn import Attention, GeGLU, KVCache, RMSNorm, Rotary


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, rotary, cfg.dropout)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = GeGLU(cfg.d_model, cfg.mlp_hidden, cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cache, layer))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        rotary = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, rotary) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias") or "norm" in name:
                nn.init.zeros_(p)
            elif name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=resid_std)
            else:
                nn.init.normal_(p, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        w = self.embed.weight
        return KVCache(c.n_layer, batch, c.n_kv_head, c.block_size, c.head_dim,
                       device or w.device, dtype or w.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy in nats/token."""
        start = cache.length if cache is not None else 0
        if start + idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of {start + idx.shape[1]} tokens exceeds block_size "
                             f"{self.config.block_size}")
        x = self.drop(self.embed(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += idx.shape[1]
        logits = F.linear(self.norm(x), self.embed.weight)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss
