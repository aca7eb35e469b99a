"""The nested GPT: one transformer whose every weight is shared by nested sub-models.

Pre-norm decoder blocks (RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> GeGLU -> residual), a final RMSNorm and an output head tied to the token
embedding. Every layer comes from ``fractalformer.nn`` and is sliced by one
:class:`~fractalformer.nn.Nesting`:

* ``levels = 1`` is the dense reference GPT;
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
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, NestingConfig
from ..memory import check_model_fits
from ..nn import Attention, Embedding, GeGLU, KVCache, Nesting, RMSNorm, Rotary
from ..nn.norms import widen


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
    """Dense GPT when ``levels == 1``; otherwise every level of nested sub-models at once.

    ``forward(idx, targets)`` returns ``(logits, loss, sub_losses)``: the full model's
    logits (B, T, vocab), the weighted training loss over all sub-models, and each
    sub-model's own mean cross-entropy (level by level, index by index; detached).
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
        self.group_targets: dict[int, torch.Tensor] = {}  # level -> (vocab, vocab) soft targets
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

    # -- the pieces subclasses change ----------------------------------------------------------
    def make_mlp(self, layer: int) -> nn.Module:
        """The feed-forward part of block ``layer``: called with ``(x, level)``."""
        c = self.config
        return GeGLU(self.nest, c.d_model, c.mlp_hidden, c.mlp_bias)

    def aux_loss(self) -> torch.Tensor | None:
        """A loss term the last forward pass left behind (the MoE's ponder cost), if any."""
        return None

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

    def set_groups(self, groups: dict[int | str, list[list[int]]]) -> None:
        """Train sub-models on soft targets spread over token groups (``fractalformer.hierarchy``).

        Key ``W``: every sub-model of width W; ``"W.j"``: sub-model j of that width alone.
        Sub-models not named keep plain cross-entropy.
        """
        from ..hierarchy import group_key, target_matrix

        device, vocab = self.embed.weight.device, self.config.vocab_size
        by_sub = {group_key(k): g for k, g in groups.items()}
        self.group_targets = {}
        for lv in range(self.nest.levels):
            w = self.level_width(lv)
            per = [by_sub.get((w, j), by_sub.get((w, -1))) for j in range(self.nest.count(lv))]
            if any(g is not None for g in per):  # (count, vocab, vocab): row y of j = j's target
                self.group_targets[lv] = torch.stack([target_matrix(g or [], vocab) for g in per]).to(device)

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
        from ..errors import FractalError

        self.nest.check(level, index)
        if not self.extractable(level):
            raise FractalError(f"level {level} is not extractable: with residual="
                               f"{self.config.nesting.residual} its sub-models read other levels' states")
        w = self.embed.weight
        dense = GPT(self.sub_model_config(level)).to(w.dtype)  # a float64 model stays float64
        state = {}
        for mod_name, mod in self.named_modules():
            dims = getattr(mod, "nest_dims", None)
            if dims is None:
                continue
            for pname, p in mod.named_parameters(recurse=False):
                state[f"{mod_name}.{pname}"] = self.nest.take(p.detach(), level, dims[pname])[index].clone()
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

    def run(self, idx: torch.Tensor, levels: list[int], caches: Caches | None = None
            ) -> dict[int, torch.Tensor]:
        """Logits of every sub-model of ``levels``: level -> (count, B, T, vocab).

        ``idx`` is (B, T) - every sub-model reads the whole batch - or (levels, B, T) for
        routed data, where sub-model ``j`` of level ``l`` reads row block ``j`` of ``idx[l]``.
        """
        t = idx.shape[-1]
        start = next(iter(caches.values())).longest() if caches else 0
        if start + t > self.config.block_size:
            raise ValueError(f"sequence of {start + t} tokens exceeds block_size {self.config.block_size}")
        states = {}
        for lv in levels:
            x = idx if idx.dim() == 2 else _rows(idx[lv], self.nest.count(lv))
            states[lv] = self.drop(self.embed(x, lv))
        for i, block in enumerate(self.blocks):
            states = {lv: block(x, lv, caches[lv] if caches else None, i) for lv, x in states.items()}
            states = self.exchange(states, i)
        if caches:
            for cache in caches.values():
                cache.length = cache.length + t  # a new object: per-row lengths may be shared
        return self.head(states)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Caches | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        logits = self.run(idx, self.body_levels() if cache is None else sorted(cache), cache)
        if targets is None:
            return logits[0][0], None, None
        losses, trained = [], []
        d = self.config.nesting.distill
        teacher = F.log_softmax(widen(logits[0][0].detach()), -1) if d else None  # (B, T, V)
        for lv, lg in sorted(logits.items()):
            y = targets if targets.dim() == 2 else _rows(targets[lv], lg.shape[0])
            y = y.expand(lg.shape[0], *y.shape[-2:]).flatten()
            logp = F.log_softmax(widen(lg), -1)
            if lv in self.group_targets:  # soft targets: -mean log p over the target's group
                tm = self.group_targets[lv]
                soft = tm[torch.arange(len(tm), device=y.device)[:, None], y.view(len(tm), -1)]
                ce = -(soft.flatten(0, 1) * logp.flatten(0, 2)).sum(-1)
            else:
                ce = F.nll_loss(logp.flatten(0, 2), y, reduction="none")
            ce = ce.view(lg.shape[0], -1).mean(1)
            losses.append(ce)
            if teacher is not None and lv > 0:  # self-distillation: agree with the full model
                kl = (teacher.exp() * (teacher - logp)).sum(-1).flatten(1).mean(1)
                ce = (1 - d) * ce + d * kl
            trained.append(ce)
        sub = torch.cat(losses)
        loss = (torch.cat(trained) * self.weights).sum()
        aux = self.aux_loss()
        return logits[0][0], loss if aux is None else loss + aux, sub.detach()

    # -- the Python API of a loaded model (fractalformer.load sets .tokenizer) --------------------
    def stream(self, prompt: str, max_new_tokens: int = 200, **kwargs: Any) -> Iterator[str]:
        """Text pieces continuing ``prompt``; keyword arguments and defaults as :meth:`generate`."""
        from ..generate.sampling import stream_text

        return stream_text(self, prompt, max_new_tokens, **kwargs)

    def generate(self, prompt: str, max_new_tokens: int = 200, **kwargs: Any) -> str:
        """The text continuing ``prompt`` (without it), with the ``sample`` command's defaults.

        Keywords: ``temperature`` (0.8; 0 = greedy), ``top_k``, ``top_p``, ``seed``, ``level``
        and ``index`` (the sub-model; ``index="ensemble"`` for a whole level), ``on_unknown``
        (``"error"`` or ``"replace"``), ``use_cache`` and ``compile`` (torch.compile the decode step).
        """
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))

    @torch.no_grad()
    def sub_model_logits(self, idx: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        """Logits (B, T, vocab) of every sub-model on token ids ``idx`` (B, T), keyed (level, index)."""
        return {(lv, j): lg[j] for lv, lg in self.run(idx, self.body_levels()).items()
                for j in range(lg.shape[0])}


def _rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T) -> (n, B / n, T): sub-model j's share of the batch."""
    return idx.view(n, idx.shape[0] // n, idx.shape[1])
