"""The next-concept predictor: causal concept tiers above the tokens.

"Tier" is this family's word for a step of the concept hierarchy (the config key
``concept.levels`` counts the tiers above the tokens); "level" stays the nesting level
of the other families, which here is always 0 (the family is not nested).

Tier 0 is the tokens (or bytes). A concept of tier ``k`` is ``combo_k`` consecutive units
of tier ``k - 1`` made into one vector: RMSNorm of their sum (the seed) or of a linear
map of their concatenation (``combiner=linear``, order-aware). Groups are aligned to the
start of the window; a trailing group that is not complete yet is no concept.

Every concept tier is a causal transformer over the sequence ``[start_k, c_k(0), c_k(1),
...]``: a learned start concept, then the tier's complete concepts. Its state at
position ``j`` has read concepts ``0 .. j - 1`` only, so it is the tier's *plan* for
concept ``j``: a regression head predicts ``c_k(j)`` from it (cosine, MSE or L1 against
the detached concept; the loss is ``fractalformer.train.losses.concept_regression``), and
unit ``i`` of the tier below, which lies in concept ``j = i // combo_k``, reads the plans
``0 .. j`` of the tier above - by cross-attention (``concept_read=cross``, in every block)
or by adding the current plan to its input (``add``). This is the one-concept shift of
MegaByte / Block Transformer / BLT: a unit never sees a summary of the concept it belongs
to, so the model is causal (the seed's v11.3 read ground-truth summaries of the current
concept: a leak).

Generation runs top-down with a KV cache at every tier (:class:`ConceptCache`): a concept
tier advances one position when a group of the tier below completes, the tokens are
written under the current plan; cached generation equals the full forward.

With a variable ``chunking`` (``space``, ``entropy``, ``learned``: fractalformer/nn/chunking.py)
a tier-1 concept is a chunk of data-dependent length: unit ``t`` may start one, decided from
units ``<= t`` (the states of ``concept.encoder`` blocks below the plan read). Unit ``t`` lies
in chunk ``g_t`` (the starts so far, minus one) and reads plan ``g_t``, made from the chunks
before it, so the one-concept shift holds. The full forward gathers every row's chunks by
index (:meth:`ConceptGPT.forward_chunked`); cached generation decides boundaries online and
advances each row's tiers when its own chunks close (:meth:`ConceptGPT.step`).

``grow`` adds a new top tier to a trained model as a no-op: the tier below reads it
through a scale initialised to zero, so every logit is unchanged at the step of growth.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import FractalError
from ..nn import KVCache, Linear, RMSNorm, Rotary
from ..nn.attention import NATIVE_GQA
from ..nn.chunking import Router, entropy, entropy_starts, space_starts
from ..nn.decode import memo
from .gpt import GPT, Block

State = torch.Tensor  # (1, B, n, d): a tier's vectors, with the leading sub-model axis of nn


class CrossAttention(nn.Module):
    """Queries of a tier attend to the plans of the tier above up to their own concept.

    RoPE rotates a query by the index of its concept and a key by its own index, so scores
    depend on how many concepts back a plan lies.
    """

    def __init__(self, cfg: ModelConfig, nest: object) -> None:
        super().__init__()
        self.hq, self.hkv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.norm = RMSNorm(nest, cfg.d_model, cfg.norm_eps)
        self.q = Linear(nest, cfg.d_model, self.hq * self.hd, False)
        self.kv = Linear(nest, cfg.d_model, 2 * self.hkv * self.hd, False, out_groups=2)
        self.o = Linear(nest, self.hq * self.hd, cfg.d_model, False)

    def keys(self, plans: State, start: int, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, hkv, n, hd) of plans at positions ``start ..``."""
        _, b, n, _ = plans.shape
        k, v = self.kv(plans, 0).view(b, n, 2, self.hkv, self.hd).permute(2, 0, 3, 1, 4)
        return rotary(k, start), v

    def forward(self, x: State, group: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rotary: Rotary) -> State:
        """x: (1, B, t, d); ``group`` (t,): the concept of the tier above each query lies in."""
        _, b, t, _ = x.shape
        q = self.q(self.norm(x, 0), 0).view(b, t, self.hq, self.hd)
        # rotate query i by its own position group[i]: one rotary row per query
        q = rotary(q.permute(1, 0, 2, 3).reshape(t, b * self.hq, 1, self.hd), group)
        q = q.view(t, b, self.hq, self.hd).permute(1, 2, 0, 3)
        if self.hkv != self.hq and not NATIVE_GQA:
            k, v = (z.repeat_interleave(self.hq // self.hkv, dim=1) for z in (k, v))
        mask = torch.arange(k.shape[-2], device=x.device)[None, :] <= group[:, None]
        gqa = {"enable_gqa": True} if self.hkv != self.hq and NATIVE_GQA else {}
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        return self.o(y.transpose(1, 2).reshape(1, b, t, self.hq * self.hd), 0)


class Reader(nn.Module):
    """How one tier reads the tier above: per-block cross-attention, or one projection of
    the current plan added to the tier's input."""

    def __init__(self, cfg: ModelConfig, nest: object, layers: int) -> None:
        super().__init__()
        if cfg.concept.read == "cross":
            self.cross = nn.ModuleList(CrossAttention(cfg, nest) for _ in range(layers))
        else:
            self.plan = Linear(nest, cfg.d_model, cfg.d_model, False)


class Memory:
    """What a tier reads of the tier above: its plans and, for cross-attention, every
    block's keys and values of them, extended as the tier above advances."""

    def __init__(self) -> None:
        self.plans: State | None = None
        self.added: State | None = None  # concept_read=add: the projected plans, times the read scale
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def extend(self, plans: State, reader: Reader, scale: torch.Tensor, layers: int, rotary: Rotary) -> None:
        start = 0 if self.plans is None else self.plans.shape[2]
        self.plans = plans if self.plans is None else torch.cat([self.plans, plans], 2)
        if not hasattr(reader, "cross"):  # projected and scaled once per plan, not per unit reading it
            added = scale * reader.plan(plans, 0)
            self.added = added if self.added is None else torch.cat([self.added, added], 2)
            return
        new = [reader.cross[i].keys(plans, start, rotary) for i in range(layers)]
        self.kv = new if not self.kv else [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
                                           for (k0, v0), (k1, v1) in zip(self.kv, new, strict=True)]


class Prediction(NamedTuple):
    """One tier's next-concept prediction of a training forward: what its regression reads."""

    tier: int
    predicted: State  # the regression head of the tier's plans 0 .. n - 1
    concept: State  # the complete concepts 0 .. n - 1 they plan, detached
    mask: torch.Tensor | None = None  # (B, n): which concepts are complete (variable chunks)


class Chunks(NamedTuple):
    """The level-1 chunks of a training forward with a variable chunking: what the chunker's
    own loss reads (fractalformer.train.losses.chunking_loss)."""

    starts: torch.Tensor  # (B, T) bool: unit t opens a chunk
    probs: torch.Tensor | None  # learned: the router's probabilities (B, T)
    logits: torch.Tensor | None  # entropy: the encoder's next-unit logits (1, B, T, vocab)


class Chunked:
    """Per-row generation state of a variable chunking: each row's tiers advance when its own
    chunks close, in preallocated buffers addressed by position (rows that do not advance
    compute into a free slot that a later step overwrites)."""

    def __init__(self, model: ConceptGPT, batch: int, device: torch.device | str, dtype: torch.dtype) -> None:
        top, d = model.config.concept.levels, model.config.d_model
        z = dict(device=device, dtype=dtype)
        self.count = [torch.zeros(batch, dtype=torch.long, device=device) for _ in range(top + 1)]
        self.sums = torch.zeros(batch, model.capacity(1), d, **z)  # running sums of level-1 chunks
        # concepts[k]: the complete concepts of tier k; added[k]: tier k's plans as tier k - 1 reads them
        self.concepts = [None, *(torch.zeros(batch, model.capacity(k), d, **z) for k in range(1, top + 1))]
        self.added = [None, *(torch.zeros(batch, model.capacity(k), d, **z) for k in range(1, top + 1))]
        self.prev: torch.Tensor | None = None  # the chunker's memory of the last unit


class ConceptCache:
    """Generation state of every tier: self-attention KV caches, the complete concepts
    (tier 0: the token embeddings) and what each tier has read of the one above.

    ``length`` is the number of tokens seen; :meth:`reset` starts over (the sampler's
    sliding window). There is no rolling back: concepts once complete stay made.
    """

    def __init__(self, model: ConceptGPT, batch: int, kv: bool, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        c, w = model.config, model.embed.weight
        self.tiers = c.concept.levels + 1
        self.kv = ([KVCache(model.depth(k), batch, c.n_kv_head, model.capacity(k), c.head_dim,
                            device or w.device, dtype or w.dtype) for k in range(self.tiers)] if kv else None)
        self._make = (lambda: Chunked(model, batch, device or w.device, dtype or w.dtype)
                      ) if kv and c.concept.variable() else None
        self.reset()

    def reset(self) -> None:
        """Forget every token: the KV slots are masked until overwritten (position-addressed)."""
        for kv in self.kv or []:
            kv.reset()
        self.units: list[State | None] = [None] * self.tiers  # complete concepts of each tier
        self.done = [0] * self.tiers  # positions computed at each tier
        self.memory = [Memory() for _ in range(self.tiers - 1)]  # memory[k]: tier k reads tier k + 1
        self.chunks = self._make() if self._make else None
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def longest(self) -> int:
        return self._length


class ConceptGPT(GPT):
    """The dense GPT as tier 0 (the tokens), with ``concept.levels`` causal concept tiers above.

    The family has one nesting level: ``forward`` returns the token logits as every family
    does ({0: (1, B, T, vocab)}). A training forward also leaves ``last_predictions``, the
    tiers' next-concept predictions, for the regression loss (``fractalformer.train.losses``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        c = cfg
        n_tiers = c.concept.levels
        self.combo = c.concept.combos()
        self.span = [math.prod(self.combo[:k]) for k in range(n_tiers + 1)]  # tokens per concept
        rot = list(self.rotary)
        cl = c.concept.layers or c.n_layer
        # tier k's blocks: self.blocks (tier 0, or every tier when shared) or stacks[k - 1]
        self.stacks = nn.ModuleList() if c.concept.share else nn.ModuleList(
            nn.ModuleList(Block(c, self.nest, rot, self.make_mlp(i)) for i in range(cl))
            for _ in range(n_tiers))
        # a shared stack tells the tiers apart by an embedding added to their inputs
        self.level_emb = nn.Parameter(torch.empty(n_tiers + 1, c.d_model)) if c.concept.share else None
        # readers[k] reads tier k + 1 (one shared by every tier when shared)
        self.readers = nn.ModuleList(Reader(c, self.nest, c.n_layer if c.concept.share or k == 0 else cl)
                                     for k in range(1 if c.concept.share else n_tiers))
        self.read_scale = nn.ParameterList(nn.Parameter(torch.empty(c.d_model)) for _ in range(n_tiers))
        self.start = nn.ParameterList(nn.Parameter(torch.empty(c.d_model)) for _ in range(n_tiers))
        cc = c.concept
        # with variable chunks a level-1 concept is RMSNorm of its units' sum: no combiner there
        self.combiners = nn.ModuleList(
            nn.Identity() if cc.variable() and i == 0 else Linear(self.nest, k * c.d_model, c.d_model, False)
            for i, k in enumerate(self.combo)) if cc.combiner == "linear" else nn.ModuleList()
        self.encoder = cc.encoder_blocks()  # unit-level blocks below the plan read (variable chunks)
        self.router = Router(self.nest, c.d_model) if cc.chunking == "learned" else None
        if cc.chunking == "entropy":  # a running quantile of the encoder's entropies (NaN: none seen yet)
            self.register_buffer("entropy_threshold", torch.tensor(float("nan")))
        self.last_chunks: Chunks | None = None
        self.concept_norms = nn.ModuleList(RMSNorm(self.nest, c.d_model, c.norm_eps) for _ in range(n_tiers))
        self.plan_norms = nn.ModuleList(RMSNorm(self.nest, c.d_model, c.norm_eps) for _ in range(n_tiers))
        # a head only where the regression loss is on: every parameter takes part in the loss (DDP)
        self.heads = nn.ModuleDict({str(k + 1): Linear(self.nest, c.d_model, c.d_model, False)
                                    for k, w in enumerate(c.concept.weights()) if w > 0})
        self.last_predictions: list[Prediction] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not hasattr(self, "read_scale"):  # GPT.__init__ calls this before the concept parts exist
            return
        super().reset_parameters()
        resid_std = self.config.init_std / math.sqrt(2 * self.config.n_layer)
        for reader in self.readers:
            for x in getattr(reader, "cross", []):
                nn.init.normal_(x.o.weight, std=resid_std)
        # closed by default: at init the token tier is exactly the dense GPT, and the read
        # path opens at the pace Adam moves this gate (a zeroed projection would open at once)
        for s in self.read_scale:
            nn.init.constant_(s, self.config.concept.read_init)
        if self.router is not None:
            self.router.reset_parameters()

    # -- shapes ---------------------------------------------------------------------------
    def depth(self, tier: int) -> int:
        c = self.config
        return c.n_layer if tier == 0 else (c.concept.layers or c.n_layer)

    def positions(self, tokens: int, tier: int) -> int:
        """Positions tier ``tier`` runs for ``tokens`` tokens: every concept they touch."""
        return (tokens - 1) // self.span[tier] + 1

    def capacity(self, tier: int) -> int:
        """Slots of tier ``tier``'s generation buffers: its most positions in one block, and,
        with variable chunks (a chunk may be one unit long), a free slot for a row that does
        not advance."""
        if not self.config.concept.variable() or tier == 0:
            return self.positions(self.config.block_size, tier)
        return (self.capacity(tier - 1) - 1) // (self.combo[tier - 1] if tier > 1 else 1) + 2

    def blocks_of(self, tier: int) -> list[Block]:
        if tier == 0:
            return list(self.blocks)
        stack = self.blocks if self.config.concept.share else self.stacks[tier - 1]
        return list(stack)[: self.depth(tier)]

    def plan_of(self, pos: torch.Tensor | int, tier: int) -> torch.Tensor | int:
        """The latest plan of tier ``tier + 1`` that units ``pos`` of ``tier`` may read: the
        plan of the concept they lie in, made from the concepts before it only."""
        return pos // self.combo[tier]

    def reader(self, tier: int) -> Reader:
        return self.readers[0 if self.config.concept.share else tier]

    # -- the family interface ---------------------------------------------------------------
    def new_cache(self, batch: int, levels: list[int] | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None
                  ) -> dict[int, ConceptCache]:
        """The generation state of every tier, under the one nesting level 0."""
        return {0: ConceptCache(self, batch, True, device, dtype)}

    def sub_model_config(self, level: int) -> ModelConfig:
        self.nest.check(level)
        return self.config

    def extractable(self, level: int) -> bool:
        return False  # not nested: the run folder already holds the only model

    def extract(self, level: int, index: int) -> GPT:
        raise FractalError("family concept is not nested: its run folder already holds the only model")

    def forward(self, idx: torch.Tensor, levels: list[int] | None = None,
                cache: dict[int, ConceptCache] | None = None) -> dict[int, torch.Tensor]:
        """Token logits {0: (1, B, t, vocab)} for ``idx`` (B, t) following the cached tokens
        (``levels``: the nesting levels, here only 0)."""
        state = cache[0] if cache else ConceptCache(self, idx.shape[0], False)
        b, t = idx.shape
        total = state.length + t
        if total > self.config.block_size:
            raise ValueError(f"sequence of {total} tokens exceeds block_size {self.config.block_size}")
        if self.config.concept.variable():
            if cache:  # boundaries decided online, one unit at a time
                return {0: torch.cat([self.step(idx[:, i : i + 1], state)[0] for i in range(t)], 2)}
            return self.forward_chunked(idx, state)
        emb = self.embed(idx, 0)  # (1, B, t, d)
        self.add_units(state, emb, total)
        top = self.config.concept.levels
        for k in range(top, 0, -1):  # top-down: a tier's plans exist before the tier below reads them
            new = self.positions(total, k) - state.done[k]
            if new <= 0:
                continue
            first = state.done[k]
            units = state.units[k]
            inputs = []
            if first == 0:
                inputs.append(self.start[k - 1].view(1, 1, 1, -1).expand(1, b, 1, -1))
            lo, hi = max(first - 1, 0), first + new - 1  # position j reads concept j - 1
            if hi > lo:
                inputs.append(units[:, :, lo:hi])
            x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, 2)
            plans = self.run_tier(k, x, first, state)
            state.memory[k - 1].extend(plans, self.reader(k - 1), self.read_scale[k - 1], self.depth(k - 1),
                                       self.rotary[0])
        x = self.run_tier(0, emb, state.length, state)
        state._length = total
        self.last_predictions = self.predict(state) if cache is None and self.training else []
        return self.head({0: x})

    def add_units(self, state: ConceptCache, emb: State, total: int) -> None:
        """Append the new token embeddings and every concept they complete, tier by tier."""
        state.units[0] = emb if state.units[0] is None else torch.cat([state.units[0], emb], 2)
        for k in range(1, self.config.concept.levels + 1):
            have = 0 if state.units[k] is None else state.units[k].shape[2]
            complete = total // self.span[k]
            if complete <= have:
                break
            c = self.combo[k - 1]
            parts = state.units[k - 1][:, :, have * c : complete * c]
            v = self.combine(k, parts.unflatten(2, (complete - have, c)))
            state.units[k] = v if state.units[k] is None else torch.cat([state.units[k], v], 2)

    def combine(self, k: int, parts: torch.Tensor) -> State:
        """Concepts of tier ``k`` from groups of units (1, B, n, c, d) of the tier below."""
        if self.config.concept.combiner == "linear":
            v = self.combiners[k - 1](parts.flatten(-2), 0)
        else:
            v = parts.sum(3)
        return self.concept_norms[k - 1](v, 0)

    # -- variable chunks ---------------------------------------------------------------------
    def run_units(self, x: State, kv: KVCache | None, lo: int, hi: int, tier: int = 0) -> State:
        """Tier ``tier``'s blocks ``lo .. hi - 1`` on ``x`` (plans are added by the caller)."""
        if lo == 0 and self.level_emb is not None:
            x = x + memo(self, ("level_emb", tier), (self.level_emb,), lambda: self.level_emb[tier])
        blocks = self.blocks_of(tier)
        for i in range(lo, hi):
            x = blocks[i](x, 0, kv, i)
        return x

    @torch.no_grad()
    def boundaries(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: where the level-1 chunks of ``idx`` (B, T) start, as the forward decides."""
        if not self.config.concept.variable():
            return (torch.arange(idx.shape[1], device=idx.device) % self.combo[0] == 0).expand(idx.shape)
        return self.chunk(idx, self.run_units(self.embed(idx, 0), None, 0, self.encoder)).starts

    def chunk(self, idx: torch.Tensor, u: State) -> Chunks:
        """Where level-1 chunks start in ``idx`` (B, T), from its units' states ``u`` below the read."""
        kind = self.config.concept.chunking
        if kind == "space":
            return Chunks(space_starts(idx), None, None)
        if kind == "learned":
            p = self.router(u)
            return Chunks(p >= 0.5, p, None)
        logits = self.head({0: u})[0]
        ent = entropy(logits[0]).detach()
        starts = entropy_starts(ent, self.entropy_threshold)  # the threshold of earlier batches only
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():  # a running quantile: the share of starts 1 / chunk_size
                q = torch.quantile(ent[:, :-1].flatten(), 1 - 1 / self.config.concept.chunk_size)
                thr = self.entropy_threshold
                thr.copy_(torch.where(thr.isnan(), q, 0.9 * thr + 0.1 * q))
        return Chunks(starts, None, logits)

    def chunk_step(self, idx: torch.Tensor, u: State, prev: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`chunk` for one unit (B, 1) after units the chunker kept ``prev`` of: whether it
        starts a chunk (B,), the router's probability, and what to keep of it."""
        kind = self.config.concept.chunking
        if kind == "space":
            return space_starts(idx, prev)[:, 0], None, idx[:, 0]
        if kind == "learned":
            p, k = self.router.scores(u, prev)
            return p[:, 0] >= 0.5, p[:, 0], k[:, 0]
        ent = entropy(self.head({0: u})[0][0, :, 0])
        return entropy_starts(ent[:, None], self.entropy_threshold, prev)[:, 0], None, ent

    def forward_chunked(self, idx: torch.Tensor, state: ConceptCache) -> dict[int, torch.Tensor]:
        """The full forward with variable level-1 chunks: every row's chunks gathered by index
        (no loop over chunks), the tiers run on rows padded to the longest."""
        c, top = self.config, self.config.concept.levels
        b, d = idx.shape[0], c.d_model
        u = self.run_units(self.embed(idx, 0), None, 0, self.encoder)
        chunks = self.chunk(idx, u)
        g = chunks.starts.long().cumsum(1) - 1  # (B, T): the chunk of each unit
        counts = [None, g[:, -1] + 1]  # positions each row runs at each tier
        sums = u.new_zeros(b, int(counts[1].max()), d).scatter_add_(1, g[..., None].expand(-1, -1, d), u[0])
        concepts = [None, self.concept_norms[0](sums[None], 0)]
        for k in range(2, top + 1):
            ck, below = self.combo[k - 1], concepts[k - 1]
            n = (below.shape[2] - 1) // ck + 1
            parts = F.pad(below, (0, 0, 0, n * ck - below.shape[2])).unflatten(2, (n, ck))
            concepts.append(self.combine(k, parts))
            counts.append((counts[k - 1] - 1) // ck + 1)
        state.units[1:] = concepts[1:]
        for k in range(top, 0, -1):
            start = self.start[k - 1].view(1, 1, 1, -1).expand(1, b, 1, -1)
            plans = self.run_tier(k, torch.cat([start, concepts[k][:, :, :-1]], 2), 0, state)
            state.memory[k - 1].extend(plans, self.reader(k - 1), self.read_scale[k - 1], 0, self.rotary[0])
        added = state.memory[0].added
        if chunks.probs is not None:  # H-Net's smoothing: a plan is mixed with the one before it
            share = chunks.probs.new_zeros(g.shape[0], added.shape[2]).scatter_add_(
                1, g, chunks.probs * chunks.starts)  # each chunk's probability at its start
            added = smooth(added, share)
        read = added[0].gather(1, g[..., None].expand(-1, -1, d))[None]
        if chunks.probs is not None:  # straight-through: a value of 1 whose gradient reaches the router
            conf = torch.where(chunks.starts, chunks.probs, 1 - chunks.probs)
            read = read * (conf + (1 - conf).detach())[None, ..., None]
        x = self.run_units(u + read, None, self.encoder, c.n_layer)
        state._length = idx.shape[1]
        training = self.training
        self.last_predictions = self.predict(state, counts=counts) if training else []
        self.last_chunks = chunks if training else None
        return self.head({0: x})

    @torch.no_grad()
    def step(self, idx: torch.Tensor, state: ConceptCache) -> dict[int, torch.Tensor]:
        """One unit (B, 1) of cached generation with variable chunks: the chunker decides
        online, and each row's tiers advance where its own chunks close."""
        cs, top, b = state.chunks, self.config.concept.levels, idx.shape[0]
        rows = torch.arange(b, device=idx.device)
        u = self.run_units(self.embed(idx, 0), state.kv[0], 0, self.encoder)
        starts, probs, cs.prev = self.chunk_step(idx, u, cs.prev if state.length else None)
        grew = [None, starts]  # which rows' tier k runs a new position
        cs.count[1] = cs.count[1] + starts
        g = cs.count[1] - 1
        cs.sums[rows, g] += u[0, :, 0]
        closed = starts & (g >= 1)  # the chunk before this one is complete: a level-1 concept
        if bool(closed.any()):
            last = (g - 1).clamp(min=0)
            v = self.concept_norms[0](cs.sums[rows, last][None, :, None], 0)[0, :, 0]
            cs.concepts[1][rows, last] = torch.where(closed[:, None], v, cs.concepts[1][rows, last])
        for k in range(2, top + 1):
            ck = self.combo[k - 1]
            grew.append(grew[k - 1] & ((cs.count[k - 1] - 1) % ck == 0))
            if not bool(grew[k].any()):  # no row's tier k advances, nor any tier above it
                grew += [grew[k]] * (top - k)
                break
            cs.count[k] = cs.count[k] + grew[k]
            last = (cs.count[k] - 2).clamp(min=0)
            members = last[:, None] * ck + torch.arange(ck, device=idx.device)
            parts = cs.concepts[k - 1][rows[:, None], members]
            v = self.combine(k, parts[None, :, None])[0, :, 0]
            done = grew[k] & (cs.count[k] >= 2)
            cs.concepts[k][rows, last] = torch.where(done[:, None], v, cs.concepts[k][rows, last])
        for k in range(top, 0, -1):
            if not bool(grew[k].any()):
                continue
            pos = cs.count[k] - grew[k].long()  # a new position, or a free slot for rows that wait
            x = torch.where((pos == 0)[:, None], self.start[k - 1],
                            cs.concepts[k][rows, (pos - 1).clamp(min=0)])[None, :, None]
            if k < top:
                x = x + cs.added[k + 1][rows, pos // self.combo[k]][None, :, None]
            kv = state.kv[k]
            kv.length = pos
            x = self.run_units(x, kv, 0, self.depth(k), k)
            kv.length = cs.count[k]
            plans = self.plan_norms[k - 1](x, 0)
            added = (self.read_scale[k - 1] * self.reader(k - 1).plan(plans, 0))[0, :, 0]
            if k == 1 and probs is not None:
                before = torch.where((pos > 0)[:, None], cs.added[1][rows, (pos - 1).clamp(min=0)], 0.0)
                added = smooth_step(added, before, probs)
            cs.added[k][rows, pos] = torch.where(grew[k][:, None], added, cs.added[k][rows, pos])
        x = u + cs.added[1][rows, cs.count[1] - 1][None, :, None]
        x = self.run_units(x, state.kv[0], self.encoder, self.config.n_layer)
        state.kv[0].length += 1
        state._length += 1
        return self.head({0: x})

    def run_tier(self, k: int, x: State, first: int, state: ConceptCache, group: torch.Tensor | None = None
                 ) -> State:
        """Run tier ``k`` on positions ``first ..``; returns its normed final states. ``group``:
        the plan of the tier above each position reads up to (default: its own concept's)."""
        t = x.shape[2]
        if self.level_emb is not None:  # its row kept while decoding: one op fewer a step
            x = x + memo(self, ("level_emb", k), (self.level_emb,), lambda: self.level_emb[k])
        kv = state.kv[k] if state.kv else None
        above = state.memory[k] if k < self.config.concept.levels else None
        reader, scale = (self.reader(k), self.read_scale[k]) if above else (None, None)
        cross = above is not None and hasattr(reader, "cross")
        if above is not None and group is None:  # one position read by addition (decoding): an int
            group = (self.plan_of(first, k) if t == 1 and not cross
                     else self.plan_of(torch.arange(first, first + t, device=x.device), k))
        if above is not None and not cross:  # the added plans are already scaled (Memory.extend)
            added = above.added
            x = x + (added[:, :, group : group + 1] if isinstance(group, int) else added[:, :, group])
        for i, block in enumerate(self.blocks_of(k)):
            if cross:
                k_i, v_i = above.kv[i]
                x = x + scale * reader.cross[i](x, group, k_i, v_i, self.rotary[0])
            x = block(x, 0, kv, i)
        if kv is not None:
            kv.length += t
        state.done[k] = first + t
        return x if k == 0 else self.plan_norms[k - 1](x, 0)

    def predict(self, state: ConceptCache, first: list[int] | None = None,
                counts: list[torch.Tensor | None] | None = None) -> list[Prediction]:
        """Every tier's next-concept prediction: plan j's head against concept j, for the tiers
        with a head. ``first``: the position each tier's plans start at (default 0: every tier
        ran from the start); ``counts`` (variable chunks): each row's positions at each tier,
        of which all but the last plan a complete concept."""
        out = []
        for k in range(1, self.config.concept.levels + 1):
            head = self.heads[str(k)] if str(k) in self.heads else None
            concepts = state.units[k]
            if head is None or concepts is None:
                continue
            concepts = concepts[:, :, first[k]:] if first else concepts
            n = concepts.shape[2]
            mask = (torch.arange(n, device=concepts.device) < counts[k][:, None] - 1) if counts else None
            out.append(Prediction(k, head(state.memory[k - 1].plans[:, :, :n], 0), concepts.detach(), mask))
        return out


def smooth(added: State, share: torch.Tensor) -> State:
    """H-Net's smoothing of chunk outputs ``added`` (1, B, n, d) with each chunk's boundary
    probability ``share`` (B, n): ``y_j = p_j x_j + (1 - p_j) y_{j-1}``, as one matrix product
    (weights ``p_i prod_{i < m <= j} (1 - p_m)``) rather than a loop over chunks."""
    n = share.shape[1]
    keep = torch.log1p(-share.clamp(max=1 - 1e-6))  # log(1 - p)
    later = torch.ones(n, n, dtype=torch.bool, device=share.device).tril(-1)  # m > i
    segment = (keep[:, :, None] * later).cumsum(1)  # [b, j, i] = sum of log(1 - p_m), i < m <= j
    w = (share.clamp(max=1 - 1e-6)[:, None, :] * segment.exp()).tril()
    return (w @ added[0])[None]


def smooth_step(added: torch.Tensor, before: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """One step of :func:`smooth`: chunk output ``added`` (B, d) after smoothed ``before``."""
    p = p.clamp(max=1 - 1e-6)[:, None]
    return p * added + (1 - p) * before


def grow(model: ConceptGPT, combo: int = 4, weight: float | None = None) -> ConceptGPT:
    """``model`` with one more concept tier on top (``combo`` units of the old top each).

    The old top tier reads the new one through a zero scale, so the grown model computes
    exactly the same logits until training moves that scale; everything learned is kept.
    """
    c = model.config
    weights = c.concept.weights()
    cfg = c.replace(concept_levels=c.concept.levels + 1, combo=[*c.concept.combos(), combo],
                    concept_weight=[*weights, weights[-1] if weight is None else weight])
    cfg.validate()
    new = ConceptGPT(cfg).to(model.embed.weight.device)
    state = model.state_dict()
    level_emb = state.pop("level_emb", None)  # one row more: copied below
    missing, unexpected = new.load_state_dict(state, strict=False)
    top = c.concept.levels
    own = (f"stacks.{top}.", f"readers.{top}.", f"read_scale.{top}", f"start.{top}", f"combiners.{top}.",
           f"concept_norms.{top}.", f"plan_norms.{top}.", f"heads.{top + 1}.", "level_emb")
    if unexpected or any(not name.startswith(own) for name in missing):
        raise FractalError(f"cannot grow: unmatched weights {unexpected[:3]} {missing[:3]}")
    with torch.no_grad():
        if level_emb is not None:
            new.level_emb[: top + 1] = level_emb
        new.read_scale[top].zero_()
    return new.train(model.training)
