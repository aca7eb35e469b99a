"""The nested GPT: one transformer whose every weight is shared by nested sub-models.

Pre-norm decoder blocks (RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> GeGLU -> residual), a final RMSNorm and an output head tied to the token
embedding. Every layer comes from ``fractalformer.nn`` and is sliced by one
:class:`~fractalformer.nn.Nesting`:

* ``nesting.levels = 1`` is the dense reference GPT;
* ``family = "fractal"`` uses block nesting (FractalFormer, see ``fractal.py``);
* ``family = "matformer"`` uses prefix nesting of every part (MatFormer+).

Activations of level ``l`` have shape (count, B, T, width): the level's sub-models run
side by side as one batched computation. All levels advance layer by layer together,
so cross-level residuals (``fractal.py``) can exchange states after every layer.

With the embedding initialised at std 0.02 the initial logits are small, so the untrained
loss is about ln(vocab_size) - unlike the seed, whose row-normalised output gave ~73.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, NestingConfig
from ..errors import FractalError
from ..memory import check_model_fits
from ..nn import Attention, Embedding, GeGLU, KVCache, Nesting, RMSNorm, Rotary
from ..nn.nesting import nested_parameters


def dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or an identity when ``p`` is 0: no dropout op in every call of a
    decode step, where each op costs microseconds."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, nest: Nesting, rotaries: list[Rotary], mlp: nn.Module) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(nest, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(nest, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, rotaries,
                              cfg.dropout, by_heads=cfg.nesting.attn_nesting == "heads")
        self.mlp_norm = RMSNorm(nest, cfg.d_model, cfg.norm_eps)
        self.mlp = mlp
        self.drop = dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, level: int, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x, level), level, cache, layer))
        return x + self.drop(self.mlp(self.mlp_norm(x, level), level))


Caches = dict[int, KVCache]


class GPT(nn.Module):
    """Dense GPT when ``nesting.levels == 1``; otherwise every level of nested sub-models at once.

    ``forward(idx, levels, cache)`` returns the logits of every sub-model of ``levels``,
    level -> (count, B, T, vocab); every family keeps this contract. The training losses
    are ``fractalformer.train.losses``; ``weights`` are the sub-models' shares of the loss.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        if not torch.empty(0).is_meta:  # on the meta device nothing is allocated
            check_model_fits(cfg)
        self.config = cfg
        self.nest = Nesting(cfg.nest_kind, cfg.nesting.levels, cfg.nesting.split)
        c = cfg
        self.embed = Embedding(self.nest, c.vocab_size, c.d_model)
        attn_levels = self.nest.levels if c.family != "mrl" else 1
        head_dims = [c.head_dim if c.nesting.attn_nesting == "heads" else c.head_dim // c.nesting.split**lv
                     for lv in range(attn_levels)]
        self.rotary = nn.ModuleList(Rotary(h, c.block_size, c.rope_theta) for h in head_dims)
        self.blocks = nn.ModuleList(Block(c, self.nest, list(self.rotary), self.make_mlp(i))
                                    for i in range(c.n_layer))
        for block in self.blocks:  # the token level's reach (concept levels above read further)
            block.attn.window = c.token_window
        self.norm = RMSNorm(self.nest, c.d_model, c.norm_eps)
        self.drop = dropout(c.dropout)
        self.register_buffer("weights", torch.tensor(cfg.sub_model_weights()), persistent=False)
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

    def num_params(self, level: int = 0) -> int:
        """Parameters of the whole model, or those one sub-model of ``level`` uses (its slices)."""
        if level == 0:
            return sum(p.numel() for p in self.parameters())
        return sum(self.nest.take(p, level, dims)[0].numel() for _, p, dims in nested_parameters(self))

    # -- the pieces subclasses change ----------------------------------------------------------
    def make_mlp(self, layer: int) -> nn.Module:
        """The feed-forward part of block ``layer``: called with ``(x, level)``."""
        c = self.config
        return GeGLU(self.nest, c.d_model, c.mlp_hidden, c.mlp_bias)

    def body_levels(self) -> list[int]:
        """Levels whose transformer body is computed (all of them, unless overridden)."""
        return list(range(self.nest.levels))

    def exchange(self, states: dict[int, torch.Tensor], layer: int) -> dict[int, torch.Tensor]:
        """Hook after every layer: cross-level residuals in the FractalFormer."""
        return states

    def head(self, states: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Final norm and tied output of every level: level -> (count, B, T, vocab)."""
        return {lv: self.embed.logits(self.norm(x, lv), lv) for lv, x in states.items()}

    def extractable(self, level: int) -> bool:
        """Whether the sub-models of ``level`` are standalone models (no cross-level inputs)."""
        return True

    def level_width(self, level: int) -> int:
        return self.config.d_model // self.nest.split**level

    def needed_levels(self, level: int) -> list[int]:
        """Levels whose bodies must run to get the logits of ``level``."""
        return [level]

    # -- sub-models as standalone dense GPTs -------------------------------------------------
    def sub_model_config(self, level: int) -> ModelConfig:
        """The dense config of one sub-model of ``level``: same depth and vocab, narrower."""
        c = self.config
        hq, hkv, hd = self.blocks[0].attn.shape(level)
        f = self.nest.split**level
        return c.replace(family="gpt", nesting=NestingConfig(), d_model=c.d_model // f, n_head=hq,
                         n_kv_head=hkv, head_dim=hd)

    def extract(self, level: int, index: int) -> GPT:
        """Sub-model ``(level, index)`` as a dense GPT holding only its own weights."""
        self.nest.check(level, index)
        if not self.extractable(level):
            raise FractalError(f"level {level} is not extractable: with residual="
                               f"{self.config.nesting.residual} its sub-models read other levels' states")
        w = self.embed.weight
        dense = GPT(self.sub_model_config(level)).to(w.dtype)  # a float64 model stays float64
        state = {name: self.nest.take(p.detach(), level, dims)[index].clone()
                 for name, p, dims in nested_parameters(self)}
        dense.load_state_dict(state)
        return dense.to(w.device).train(self.training)

    # -- running ------------------------------------------------------------------------------
    def new_cache(self, batch: int, levels: list[int] | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Caches:
        """Empty KV caches for generation, one per level whose body runs."""
        c, w = self.config, self.embed.weight
        caches = {}
        for lv in levels if levels is not None else self.body_levels():
            _, hkv, hd = self.blocks[0].attn.shape(lv)
            caches[lv] = KVCache(c.n_layer, batch * self.nest.count(lv), hkv, c.block_size, hd,
                                 device or w.device, dtype or w.dtype)
        return caches

    def forward(self, idx: torch.Tensor, levels: list[int] | None = None, cache: Caches | None = None
                ) -> dict[int, torch.Tensor]:
        """Logits of every sub-model of ``levels``: level -> (count, B, T, vocab).

        ``levels`` defaults to those of ``cache``, else every level whose body runs. ``idx`` is
        (B, T) - every sub-model reads the whole batch - or (levels, B, T) for routed data,
        where sub-model ``j`` of level ``l`` reads row block ``j`` of ``idx[l]``. ``cache``
        (:meth:`new_cache`) holds the positions before ``idx`` and advances past it.
        """
        if levels is None:
            levels = self.body_levels() if cache is None else sorted(cache)
        t = idx.shape[-1]
        start = next(iter(cache.values())).longest() if cache else 0
        if start + t > self.config.block_size:
            raise ValueError(f"sequence of {start + t} tokens exceeds block_size {self.config.block_size}")
        states = {}
        for lv in levels:
            x = idx if idx.dim() == 2 else batch_rows(idx[lv], self.nest.count(lv))
            states[lv] = self.drop(self.embed(x, lv))
        for i, block in enumerate(self.blocks):
            states = {lv: block(x, lv, cache[lv] if cache else None, i) for lv, x in states.items()}
            states = self.exchange(states, i)
        if cache:
            for c in cache.values():
                c.length = c.length + t  # a new object: per-row lengths may be shared
        return self.head(states)


def batch_rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T) -> (n, B / n, T): sub-model j's share of the batch."""
    return idx.view(n, idx.shape[0] // n, idx.shape[1])
