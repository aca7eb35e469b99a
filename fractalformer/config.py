"""Configuration: the model (shared keys plus one section per family), training, and parsing.

A run folder's ``config.json`` is ``{"model": {...}, "train": {...}, "tokenizer": {...}}``;
the model's sections (``nesting``, ``moe``, ``concept``) are tables inside ``model``. Every
key can be set from a preset (presets.py), a TOML file and ``--set key=value``, in that
order, by its dotted name (``moe.n_experts``, ``train.lr``) or by its flat name (``n_experts``,
unambiguous; what flat config.json files of older run folders hold). A key's help text lives in its
field's metadata, so ``fractalformer config`` and the code cannot drift apart.

A section belongs to families (``FAMILIES``); under any other family it must keep its
defaults. That one rule (:meth:`ModelConfig.validate`) is why, for example, ``moe.n_experts``
cannot be set on a FractalFormer.
"""

from __future__ import annotations

import copy
import json
import math
import re
import types

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import Field, asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from .errors import FractalError
from .presets import PRESETS

NESTED = ("fractal", "matformer", "mrl")  # the families whose model holds nested sub-models


def meta(about: str, *, flat: str | None = None, form: str | None = None, strings: bool = False,
         sep: str = ",") -> dict[str, Any]:
    """A config field's metadata: its help line; for a section field its ``flat`` name; for a list
    how it is spelled as a string (``form``, items split at ``sep``) - with ``strings`` that
    spelling is read from any source (TOML files and old config.json wrote those lists as
    strings), else from ``--set`` only."""
    return {"help": about, "flat": flat, "form": form, "strings": strings, "sep": sep}


def key(default: Any, about: str, **kw: Any) -> Any:
    """A config field with an immutable default (a list: ``field(default_factory=..., metadata=meta())``)."""
    return field(default=default, metadata=meta(about, **kw))


class Section:
    """A table of model keys that only ``FAMILIES`` use; ``HINT`` explains the refusal elsewhere."""

    FAMILIES: ClassVar[tuple[str, ...]] = ()
    HINT: ClassVar[str] = ""

    def validate(self, m: ModelConfig) -> None:
        """Checks of a section in use (its family's), with the model it is part of."""


@dataclass
class NestingConfig(Section):
    """Nested sub-models: ``split**l`` blocks (fractal) or one prefix (matformer, mrl) at level l."""

    FAMILIES: ClassVar[tuple[str, ...]] = NESTED

    levels: int = key(1, "nesting depth; level l holds split**l sub-models (1 for the families that do "
                         "not nest)")
    split: int = key(2, "children per sub-model at each level")
    attn_nesting: Literal["head_dim", "heads"] = key(
        "head_dim", "how attention nests: head_dim narrows every head, heads gives blocks of whole heads")
    residual: Literal["none", "upstream", "downstream"] = key(
        "none", "family fractal only: cross-level residuals after every layer")
    residual_rank: int = key(0, "0 adds residual states directly; r > 0 through a learned rank-r map")
    glue_rank: int = key(0, "family fractal merge glue: rank-r maps between the level-1 blocks of every "
                            "linear (0: none; folded into the weights after glue training)")
    level_weights: list[float] = field(default_factory=list, metadata=meta(
        "loss weight per level (a list, or comma-separated with --set); empty: every sub-model alike",
        form="comma-separated numbers"))
    distill: float = key(0.0, "nested sub-models' loss: (1 - distill) * cross-entropy + distill * "
                              "KL(full || sub)")

    def validate(self, m: ModelConfig) -> None:
        _positive(self, "levels")
        _nonnegative(self, "residual_rank", "glue_rank")
        if self.levels < 2:
            raise FractalError(f"family {m.family} needs levels >= 2, got {self.levels}")
        if self.split < 2:
            raise FractalError(f"split must be at least 2, got {self.split}")
        if not 0.0 <= self.distill <= 1.0:
            raise FractalError(f"distill must lie in [0, 1], got {self.distill}")
        if self.distill and m.family == "mrl":
            raise FractalError("distill needs nested sub-models with their own bodies (family fractal or "
                               "matformer), not family mrl")
        if self.residual != "none" and m.family != "fractal":
            raise FractalError("cross-level residuals need family=fractal")
        if self.glue_rank and (m.family != "fractal" or self.residual != "none"):
            raise FractalError("glue_rank needs family=fractal without cross-level residuals")
        w = self.level_weights
        if w and (len(w) != self.levels or any(x < 0 for x in w) or sum(w) <= 0):
            raise FractalError(f"level_weights needs {self.levels} non-negative numbers with a "
                               f"positive sum, got {w!r}")
        f = self.split ** (self.levels - 1)
        smallest = f"split**(levels-1) = {f}"
        if m.family != "mrl":
            if self.attn_nesting == "heads":
                for name in ("n_head", "n_kv_head"):
                    if getattr(m, name) % f:
                        raise FractalError(f"attn_nesting=heads needs {name} ({getattr(m, name)}) "
                                           f"divisible by {smallest}")
            elif m.head_dim % f or (m.head_dim // f) % 2:
                raise FractalError(f"head_dim {m.head_dim} is too small to nest: it must be divisible by "
                                   f"{smallest} leaving an even (RoPE) head_dim, got {m.head_dim / f:g}")
        for name, size in {"d_model": m.d_model, "mlp hidden width": m.mlp_hidden}.items():
            if size % f:
                raise FractalError(f"{name} ({size}) is not divisible by {smallest}")


@dataclass
class MoEConfig(Section):
    """Product-key sparse layers in place of the MLP (models/moe.py, docs/moe.md)."""

    FAMILIES: ClassVar[tuple[str, ...]] = ("moe",)
    HINT: ClassVar[str] = (": an expert table cannot nest inside another family (it has no width to split "
                           "between sub-models; use family=moe, levels 1)")

    kind: Literal["none", "peer", "pkm", "fhme"] = key(
        "none", "family moe: the sparse layer (peer single-neuron experts, pkm value memory, fhme fractal "
                "experts)", flat="moe")
    layers: list[int] | Literal["all"] = field(default="all", metadata=meta(
        "layers that get the sparse layer: all, or a list of indices (comma-separated with --set)",
        flat="moe_layers", form="'all' or comma-separated layer indices", strings=True))
    with_mlp: bool = key(False, "keep the dense MLP beside the sparse layer (outputs added)",
                         flat="moe_with_mlp")
    n_experts: int = key(65536, "experts (peer, fhme) or memory slots (pkm) N, a perfect square")
    heads: int = key(4, "retrieval heads", flat="moe_heads")
    topk: int = key(8, "experts per head (at most sqrt(n_experts))", flat="moe_topk")
    key_dim: int = key(128, "query / product-key width (two halves of key_dim / 2)", flat="moe_key_dim")
    gate: Literal["softmax", "sigmoid", "relu"] = key("softmax", "routing weights from the scores",
                                                      flat="moe_gate")
    query_norm: Literal["rms", "layer", "none"] = key("rms", "per-token query normalisation (never batch "
                                                             "norm)", flat="moe_query_norm")
    sparse: bool = key(False, "row-sparse table gradients trained by SparseAdam", flat="moe_sparse")
    fhme_depth: int = key(3, "sub-blocks per fractal expert")
    fhme_adaptive: bool = key(True, "learned per-token halting (ACT); false: always full depth")
    halt_penalty: float = key(0.1, "weight of the ponder cost (mean sub-blocks run / depth)")
    shared: bool = key(False, "peer / pkm: one expert (value) table for every sparse layer, each layer "
                              "keeping its own query and keys (Memory Layers at Scale)", flat="moe_shared")
    gated: bool = key(False, "peer / pkm: multiply the layer's output by silu(W x) of its own input, per "
                             "token (Memory+)", flat="moe_gated")
    usage_weight: float = key(0.0, "weight of the usage loss: KL from uniform of each row's mean "
                                   "sub-key softmax, per layer, head and half (0: none)")
    rekey_every: int = key(0, "every this many training steps, re-draw the sub-keys no selected expert "
                              "used since the last time (0: never)")

    def layer_indices(self, n_layer: int) -> list[int]:
        """Indices of the layers whose MLP is the sparse layer (none without one)."""
        if self.kind == "none":
            return []
        return list(range(n_layer)) if self.layers == "all" else sorted(set(self.layers))

    def validate(self, m: ModelConfig) -> None:
        if self.kind == "none":
            raise FractalError("family moe needs a sparse layer: set moe to peer, pkm or fhme")
        _positive(self, "n_experts", "heads", "topk", "key_dim", "fhme_depth")
        _nonnegative(self, "halt_penalty", "usage_weight", "rekey_every")
        if self.kind == "fhme" and (self.shared or self.gated):
            raise FractalError("moe_shared and moe_gated apply to peer and pkm layers, not fhme")
        n = math.isqrt(self.n_experts)
        if n * n != self.n_experts:
            raise FractalError(f"n_experts must be a perfect square (product keys: sqrt(N) sub-keys per "
                               f"half), got {self.n_experts}; nearest: {n * n} or {(n + 1) ** 2}")
        if self.topk > n:
            raise FractalError(f"moe_topk ({self.topk}) must not exceed sqrt(n_experts) = {n}")
        if self.key_dim % 2:
            raise FractalError(f"moe_key_dim must be even (two halves), got {self.key_dim}")
        layers = self.layer_indices(m.n_layer)
        if not layers or any(not 0 <= i < m.n_layer for i in layers):
            raise FractalError(f"moe_layers must name layers in 0..{m.n_layer - 1}, got {self.layers!r}")


@dataclass
class ConceptConfig(Section):
    """Causal next-concept levels above the tokens (models/concept.py, docs/concept.md)."""

    FAMILIES: ClassVar[tuple[str, ...]] = ("concept",)

    levels: int = key(1, "family concept: causal concept levels above the tokens (level k groups combo "
                         "units of level k-1)", flat="concept_levels")
    combo: list[int] = field(default_factory=lambda: [4], metadata=meta(
        "family concept: units per concept, one number for every level or one per level ([4, 4]; "
        "\"4,4\" with --set)", form="an integer or comma-separated integers", strings=True))
    combiner: Literal["sum", "linear"] = key(
        "sum", "family concept: a concept is RMSNorm of its units' sum, or of a linear map of their "
               "concatenation")
    read: Literal["cross", "add"] = key(
        "cross", "family concept: a level reads the plans of the level above by cross-attention or by "
                 "adding the current plan", flat="concept_read")
    share: bool = key(False, "family concept: one stack of blocks for every level, plus a learned level "
                             "embedding", flat="concept_share")
    layers: int = key(0, "family concept: blocks per concept level (0: n_layer; shared: the first ones)",
                      flat="concept_layers")
    loss: Literal["cosine", "mse", "l1"] = key("cosine", "family concept: next-concept regression loss",
                                               flat="concept_loss")
    weight: list[float] = field(default_factory=lambda: [0.1], metadata=meta(
        "family concept: regression loss weight, one for every level or one per level",
        flat="concept_weight", form="a number or comma-separated numbers", strings=True))
    read_init: float = key(0.0, "family concept: initial value of read_scale, the gate on each level's "
                                "read of the level above (0: the model starts as the dense GPT and trains "
                                "stably under a short warmup; 1 stalled on the unigram plateau)",
                           flat="concept_read_init")

    chunking: Literal["fixed", "space", "entropy", "learned"] = key(
        "fixed", "family concept: where a level-1 concept ends - every combo units (fixed), after a "
                 "space-like byte (space, SpaceByte), where the byte encoder's next-byte entropy is high "
                 "(entropy, BLT), or where a learned router sees adjacent states differ (learned, H-Net)")
    encoder: int = key(-1, "family concept: unit-level blocks below the plan read, whose states the chunker "
                           "and the level-1 concepts read (-1: 1 for chunking entropy or learned, else 0)",
                       flat="concept_encoder")
    chunk_size: float = key(4.0, "family concept: target mean length of a level-1 chunk in units (chunking "
                                 "entropy and learned)")
    chunk_weight: float = key(0.03, "family concept: weight of the chunker's own loss (learned: the ratio "
                                    "loss that holds chunk_size; entropy: the encoder's next-byte loss)")

    def variable(self) -> bool:
        """Whether level-1 concepts have data-dependent lengths (every chunking but fixed)."""
        return self.chunking != "fixed"

    def encoder_blocks(self) -> int:
        """Unit-level blocks below the plan read."""
        if self.encoder >= 0:
            return self.encoder
        return 1 if self.chunking in ("entropy", "learned") else 0

    def combos(self) -> list[int]:
        """Units per concept at each concept level (level 1 first)."""
        return self.combo * self.levels if len(self.combo) == 1 else list(self.combo)

    def weights(self) -> list[float]:
        """Regression loss weight at each concept level (level 1 first)."""
        return self.weight * self.levels if len(self.weight) == 1 else list(self.weight)

    def validate(self, m: ModelConfig) -> None:
        _positive(self, "levels")
        _nonnegative(self, "layers")
        if self.share and self.layers > m.n_layer:
            raise FractalError(f"concept_share runs the concept levels on the first concept_layers of the "
                               f"{m.n_layer} shared blocks; got concept_layers {self.layers}")
        for name, each, bad in (("combo", " (one per concept level), each at least 2", lambda c: c < 2),
                                ("weight", ", each >= 0", lambda w: w < 0)):
            vals = getattr(self, name)
            if len(vals) not in (1, self.levels) or any(bad(v) for v in vals):
                raise FractalError(f"{_label(self, name)} needs one value, or {self.levels}{each}; "
                                   f"got {vals!r}")
        if self.encoder < -1:
            raise FractalError(f"concept_encoder needs -1 (automatic) or a number of blocks >= 0; "
                               f"got {self.encoder}")
        if self.variable():
            if self.read != "add":
                raise FractalError(f"chunking {self.chunking} reads the plans by addition: "
                                   "set concept_read=add")
            if self.chunking == "space" and m.vocab_size != 256:
                raise FractalError("chunking space reads UTF-8 bytes: set tokenizer=byte (vocab_size 256)")
            if self.encoder_blocks() >= m.n_layer:
                raise FractalError(f"concept_encoder {self.encoder_blocks()} leaves no unit-level block "
                                   f"above the plan read (n_layer {m.n_layer})")
            if self.chunk_size < 1 or self.chunk_weight < 0:
                raise FractalError(f"chunk_size needs >= 1 and chunk_weight >= 0; got {self.chunk_size}, "
                                   f"{self.chunk_weight}")
        elif self.encoder > 0:
            raise FractalError("concept_encoder needs a variable chunking (space, entropy or learned)")
        span = math.prod(self.combos())
        if m.block_size < span:
            raise FractalError(f"block_size {m.block_size} does not cover one top-level concept of "
                               f"{span} tokens (the product of combo {self.combo!r})")


SECTIONS: dict[str, type[Section]] = {"nesting": NestingConfig, "moe": MoEConfig, "concept": ConceptConfig}


@dataclass
class ModelConfig:
    """Model dimensions and nesting. Defaults are the seed FractalFormer's (about 1M parameters).

    ``family`` picks the model: ``gpt`` (dense, one level), ``fractal`` (block nesting:
    split**l sub-models at level l), ``matformer`` (prefix nesting of every part) or
    ``mrl`` (dense body; only the final state and tied output are prefix-nested), with the
    ``nesting`` section. ``moe`` is the dense GPT with product-key sparse layers (PEER, PKM
    or FHME) in place of the MLP (the ``moe`` section). ``concept`` puts causal next-concept
    levels above the tokens (the ``concept`` section).
    """

    family: Literal["gpt", "fractal", "matformer", "mrl", "moe", "concept"] = key(
        "gpt", "model family: gpt dense, fractal block-nested, matformer prefix-nested, mrl nested head, "
               "moe sparse experts, concept next-concept levels above the tokens")
    vocab_size: int = key(128, "tokens in the vocabulary (set from the tokenizer unless given)")
    block_size: int = key(256, "context length in tokens")
    token_window: int = key(0, "token-level attention reads only the last token_window tokens, a sliding "
                               "window (0: the whole block_size); family concept's levels still read the "
                               "whole block_size, so the model reaches past the window at about the "
                               "window's cost")
    n_layer: int = key(4, "transformer layers")
    d_model: int = key(128, "width of the residual stream")
    n_head: int = key(4, "query heads")
    n_kv_head: int = key(1, "key/value heads: 1 multi-query, n_head multi-head, between grouped-query")
    head_dim: int = key(32, "width of one attention head")
    mlp_mult: float = key(4.0, "GeGLU inner width as a multiple of d_model")
    mlp_bias: bool = key(True, "biases in the MLP")
    rope_theta: float = key(100.0, "rotary embedding base")
    norm_eps: float = key(1e-6, "RMSNorm epsilon")
    dropout: float = key(0.0, "dropout probability")
    init_std: float = key(0.02, "standard deviation of the initial weights")
    nesting: NestingConfig = field(default_factory=NestingConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    concept: ConceptConfig = field(default_factory=ConceptConfig)

    @classmethod
    def of(cls, **values: Any) -> ModelConfig:
        """A config from the defaults and keys by flat or dotted name (not validated):
        ``ModelConfig.of(family="moe", moe="peer", n_experts=64)``."""
        return cls().replace(**values)

    def replace(self, **values: Any) -> ModelConfig:
        """A copy with keys (flat or dotted names) or whole sections replaced; not validated.
        A copy shares no section or list with ``self``."""
        run = RunConfig(copy.deepcopy(self))
        for name, value in values.items():
            if isinstance(value, Section):  # a whole section (the flat key moe is moe.kind)
                setattr(run.model, name, copy.deepcopy(value))
            else:
                apply_overrides(run, {f"model.{name}": value}, strict_types=True)
        return run.model

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_mult * self.d_model)

    @property
    def nest_kind(self) -> Literal["block", "prefix"]:
        """The nesting scheme of nn.nesting.Nesting: prefix for matformer and mrl, else block."""
        return "prefix" if self.family in ("matformer", "mrl") else "block"

    def sub_model_count(self, level: int) -> int:
        """Sub-models at ``level`` (as ``Nesting.count``)."""
        return self.nesting.split**level if self.nest_kind == "block" else 1

    def sub_models(self) -> list[tuple[int, int]]:
        """Every (level, index), level by level - the order of per-sub-model losses."""
        return [(lv, j) for lv in range(self.nesting.levels) for j in range(self.sub_model_count(lv))]

    def sub_model_weights(self) -> list[float]:
        """Loss weight of every sub-model; they sum to 1.

        Default: every sub-model weighs the same (the seed summed plain cross-entropies;
        this is that sum divided by the count), so each weight entry gets an equal share of
        gradient from every sub-model that owns it.
        """
        subs = self.sub_models()
        per_level = self.nesting.level_weights or None
        raw = [per_level[lv] / sum(1 for s in subs if s[0] == lv) if per_level else 1.0 for lv, _ in subs]
        return [w / sum(raw) for w in raw]

    def sparse_layers(self) -> list[int]:
        """Indices of the layers whose MLP is a sparse (product-key) layer."""
        return self.moe.layer_indices(self.n_layer)

    def sections(self) -> dict[str, Section]:
        return {name: getattr(self, name) for name in SECTIONS}

    def used_sections(self) -> dict[str, Section]:
        """The sections this family uses, and any other that was changed (then invalid)."""
        return {name: s for name, s in self.sections().items()
                if self.family in s.FAMILIES or s != type(s)()}

    def flat_values(self) -> dict[str, Any]:
        """Every model key's value by flat name."""
        run = RunConfig(self)
        return {k.flat: k.get(run) for k in config_keys() if k.part == "model"}

    def validate(self) -> None:
        _check_choices(self)
        _positive(self, "vocab_size", "block_size", "n_layer", "d_model", "n_head", "n_kv_head",
                  "head_dim", "mlp_mult", "rope_theta", "norm_eps", "init_std")
        self._check_sections()
        if self.n_head % self.n_kv_head:
            raise FractalError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise FractalError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise FractalError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.mlp_hidden < 1:
            raise FractalError("mlp_mult * d_model must be at least 1")
        for section in self.sections().values():
            if self.family in section.FAMILIES:
                section.validate(self)
        if not 0 <= self.token_window <= self.block_size:
            raise FractalError(f"token_window must be between 0 (the whole block_size) and block_size "
                               f"{self.block_size}, got {self.token_window}")
        if self.token_window and (self.family not in ("gpt", "concept") or self.concept.share):
            raise FractalError("token_window needs family gpt, or concept with separate weights "
                               "(shared blocks also run the concept levels)")

    def _check_sections(self) -> None:
        """The one family rule: a section another family uses keeps its defaults here."""
        levels = self.nesting.levels
        if self.family not in NESTED and levels != 1:  # the commonest slip, said plainly
            what = "dense" if self.family == "gpt" else "not nested"
            raise FractalError(f"family {self.family} is {what}: levels must be 1, got {levels} "
                               f"(use family=fractal, matformer or mrl for nesting)")
        for section in self.sections().values():
            if self.family in section.FAMILIES:
                continue
            default = type(section)()
            for f in fields(section):
                if getattr(section, f.name) != getattr(default, f.name):
                    owners = ", ".join(section.FAMILIES[:-1]) + " or " if len(section.FAMILIES) > 1 else ""
                    raise FractalError(f"{_label(section, f.name)} needs family={owners}"
                                       f"{section.FAMILIES[-1]} (got family {self.family}){section.HINT}")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Defaults train the default model in ~10 min on 2 cores."""

    tokenizer: str = key("bpe128", "tokenizer: bpe128 (the seed's), char (the text's characters), byte, "
                                   "bpe:N (a byte-level BPE of N tokens trained on the training split) or "
                                   "gpt2 (tiktoken)")
    data: str | None = key(None, "UTF-8 text file or a `fractalformer prepare` folder to train on (unset: "
                                 "the shipped TinyShakespeare); stored as an absolute path")
    init_from: str | None = key(None, "fine-tuning: a run whose weights (and model config, tokenizer) "
                                      "training starts from")
    on_unknown: Literal["error", "replace"] = key("error", "characters the tokenizer lacks: error, or "
                                                           "replace them with '?'")
    batch_size: int = key(16, "sequences per step (summed over torchrun processes and micro-batches)")
    grad_accum: int = key(1, "micro-batches per optimizer step (batch_size / grad_accum rows each): less "
                             "memory, the same gradient")
    sync_every: int = key(10, "steps between reading the losses back to the host (a GPU runs ahead "
                              "meanwhile); also at every evaluation, checkpoint and the end")
    parallel: Literal["ddp", "fsdp"] = key("ddp", "under torchrun: ddp (every process holds the whole "
                                                  "model) or fsdp (parameters, gradients and optimizer "
                                                  "state sharded with fully_shard)")
    routing: Literal["shared", "split", "shard"] = key("shared", "nested models: which rows each sub-model "
                                                                 "reads (see data.corpus.training_batch)")
    sampling: Literal["all", "level", "sandwich"] = key(
        "all", "nested models: which sub-models train each step - all, one level (level_probs), or "
               "sandwich: the full model, one smallest and one random sub-model")
    level_probs: list[float] = field(default_factory=list, metadata=meta(
        "sampling=level: the probability of each level (empty: uniform)", form="comma-separated numbers"))
    mix_weight: float = key(0.0, "family fractal: each step also trains one random Mix'n'Match model (a "
                                 "level per layer) with this share of the loss (0: none)")
    level_grads: Literal["sum", "pcgrad"] = key(
        "sum", "nested models: add the levels' gradients, or pcgrad: project each off the others' where "
               "they conflict (gradient surgery)")
    data_shard: list[int] = field(default_factory=list, metadata=meta(
        "[J, N] (\"J/N\" with --set): train on contiguous shard J of N of the training tokens (empty: "
        "all of them)", form="'J/N' with 0 <= J < N", strings=True, sep="/"))
    freeze: Literal["none", "children"] = key("none", "none, or children: the level-1 sub-models' own "
                                                      "entries stay fixed and only the glue between them "
                                                      "trains (fractalformer merge)")
    schedule_start: int = key(0, "step where warmup + cosine begin (a merged or grown run's new schedule)")
    max_steps: int = key(1400, "training steps: the cosine schedule's horizon")
    lr: float = key(3e-3, "peak learning rate")
    min_lr: float = key(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = key(100, "steps of linear warmup")
    weight_decay: float = key(0.1, "AdamW weight decay of matrices")
    table_lr: float = key(0.0, "peak learning rate of expert / memory tables (0: lr); follows the same "
                               "schedule")
    beta1: float = key(0.9, "AdamW beta1")
    beta2: float = key(0.95, "AdamW beta2")
    grad_clip: float = key(1.0, "global gradient-norm clip (0: none)")
    eval_every: int = key(200, "steps between validation estimates")
    eval_batches: int = key(8, "validation batches per estimate")
    ckpt_every: int = key(200, "steps between checkpoints")
    seed: int = key(1337, "seed of the initial weights and of every step's batch")
    device: Literal["auto", "cpu", "cuda"] = key("auto", "auto (CUDA when available), cpu or cuda")
    dtype: Literal["auto", "float32", "bfloat16"] = key("auto", "auto (bf16 autocast on CUDA, fp32 on "
                                                                "CPU), float32 or bfloat16")
    compile: bool = key(False, "torch.compile the model (needs a C++ toolchain on CPU)")
    threads: int = key(0, "CPU threads for this machine, divided among torchrun processes (0: "
                          "OMP_NUM_THREADS, else every core)")
    final_eval: int = key(-1, "validation windows scored after training (and by eval): -1 as many as "
                              "trained on (max_steps x batch_size, at most the whole split), 0 none, N the "
                              "first N")
    sample_tokens: int = key(200, "length of the sample printed after training (0: none)")
    log: Literal["csv", "tensorboard"] = key("csv", "csv (metrics.csv), or tensorboard: also TensorBoard "
                                                    "scalars in RUN/tensorboard")
    groups: str = key("", "imposed token groups per width: empty none, seed, or a JSON file")
    emergent_every: int = key(0, "re-cluster the embedding into groups every N steps (0: never)")
    cluster_method: Literal["dbscan", "agglomerative"] = key("dbscan", "clustering of the emergent groups")
    cluster_eps: float = key(0.1, "cosine distance of the clustering (DBSCAN eps / agglomerative "
                                  "threshold)")
    cluster_min_samples: int = key(3, "DBSCAN min_samples")

    def validate(self) -> None:
        _check_choices(self)
        _positive(self, "batch_size", "max_steps", "lr", "eval_every", "eval_batches", "ckpt_every",
                  "grad_accum", "sync_every")
        if self.batch_size % self.grad_accum:
            raise FractalError(f"batch_size {self.batch_size} is not divisible by grad_accum "
                               f"{self.grad_accum}")
        _nonnegative(self, "table_lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "sample_tokens")
        if self.min_lr > self.lr:
            raise FractalError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FractalError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        _nonnegative(self, "schedule_start")
        if self.schedule_start >= self.max_steps:
            raise FractalError(f"schedule_start ({self.schedule_start}) must be below max_steps "
                               f"({self.max_steps})")
        self.shard()
        if not 0 <= self.seed < 2**31:
            raise FractalError(f"seed must lie in [0, 2**31), got {self.seed}")
        _nonnegative(self, "emergent_every", "threads")
        if self.final_eval < -1:
            raise FractalError(f"final_eval must be -1 (as many windows as trained on), 0 (none) or a "
                               f"number of windows, got {self.final_eval}")
        _positive(self, "cluster_eps", "cluster_min_samples")
        check_tokenizer_name(self.tokenizer)

    def shard(self) -> tuple[int, int]:
        """``data_shard`` as (J, N); (0, 1) when training on all the data."""
        if not self.data_shard:
            return 0, 1
        if len(self.data_shard) != 2 or not 0 <= self.data_shard[0] < self.data_shard[1]:
            raise FractalError(f"data_shard must be 'J/N' with 0 <= J < N, got {self.data_shard!r}")
        j, n = self.data_shard
        return j, n


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        m, t = self.model, self.train
        if (t.groups or t.emergent_every) and m.nesting.levels == 1:
            raise FractalError("token groups (groups / emergent_every) need a nested model: their loss "
                               "applies to the narrower sub-models")
        if t.freeze != "none" and (m.family != "fractal" or m.nesting.residual != "none"):
            raise FractalError("freeze=children needs a FractalFormer without cross-level residuals "
                               "(family=fractal, residual=none): its level-1 sub-models are the children")
        if m.family == "moe" and m.moe.rekey_every and t.parallel == "fsdp":
            raise FractalError("rekey_every edits whole sub-key tables: use parallel=ddp")
        nested = m.family in NESTED and m.nesting.levels > 1
        if (t.sampling != "all" or t.level_grads != "sum") and not nested:
            raise FractalError("sampling and level_grads choose among sub-models: they need a nested model "
                               "(family fractal, matformer or mrl)")
        p = t.level_probs
        if p and (len(p) != m.nesting.levels or any(x < 0 for x in p) or sum(p) <= 0):
            raise FractalError(f"level_probs needs {m.nesting.levels} non-negative numbers with a positive "
                               f"sum, got {p!r}")
        if p and t.sampling != "level":
            raise FractalError("level_probs is read only with sampling=level")
        if t.mix_weight:
            if not 0.0 < t.mix_weight < 1.0:
                raise FractalError(f"mix_weight must lie in [0, 1), got {t.mix_weight}")
            if m.family != "fractal" or m.nesting.residual != "none" or t.routing != "shared":
                raise FractalError("mix_weight trains Mix'n'Match models: it needs family=fractal without "
                                   "cross-level residuals, on shared routing")
            if t.level_grads != "sum":
                raise FractalError("mix_weight cannot combine with level_grads=pcgrad (a mix is no level)")
        if t.sampling != "all" and m.family == "mrl":
            raise FractalError("sampling must be all for family=mrl: its sizes share one body")
        if t.routing != "shared":
            if t.grad_accum > 1:
                raise FractalError(f"routing={t.routing} cannot combine with grad_accum: a micro-batch would "
                                   "re-split the sub-models' row blocks (use routing=shared)")
            if m.family == "mrl":
                raise FractalError("routing must be shared for family=mrl: its sizes share one body")
            if m.family not in NESTED:
                raise FractalError(f"routing={t.routing} needs a nested model (family fractal, "
                                   "matformer or mrl)")
            if m.nesting.distill:
                raise FractalError(f"routing={t.routing} cannot combine with distill: the sub-models "
                                   "learn from the full model's predictions on the same rows")
            if m.nesting.residual != "none":
                raise FractalError(f"routing={t.routing} cannot combine with residual={m.nesting.residual}: "
                                   "cross-level residuals need every level on the same rows")
            n = m.sub_model_count(m.nesting.levels - 1)
            if t.batch_size % n:
                raise FractalError(f"routing={t.routing} needs batch_size divisible by the {n} "
                                   f"sub-models of the last level, got {t.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """The shared model keys, the sections the family uses as tables, and the training keys."""
        model = {f.name: copy.deepcopy(getattr(self.model, f.name)) for f in fields(ModelConfig)
                 if f.name not in SECTIONS}
        model |= {name: asdict(s) for name, s in self.model.used_sections().items()}
        return {"model": model, "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """A config.json's config, sectioned or flat (older run folders: every key of every family
        written at the top level, so flat keys of sections the family does not use are dropped -
        they could hold only values without effect)."""
        if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
            raise FractalError("config must have a 'model' table")
        if not isinstance(d.get("train", {}), dict):
            raise FractalError("config's 'train' must be a table")
        family = d["model"].get("family", "gpt")
        values = {}
        for name, value in _flatten({"model": d["model"], "train": d.get("train", {})}).items():
            k = find_key(name)
            if name == f"model.{k.flat}" and k.section and family not in SECTIONS[k.section].FAMILIES:
                continue
            values[name] = value
        cfg = cls()
        for name, value in values.items():  # lists were strings in older run folders
            legacy = isinstance(value, str) and find_key(name).is_list
            apply_overrides(cfg, {name: value}, strict_types=not legacy)
        return cfg


# -- keys: names, types and parsing -----------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    """One config key: ``part`` model or train, ``section`` a model section (or ""), the field."""

    part: str
    section: str
    name: str
    flat: str
    owner: type
    spec: Field

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def kind(self) -> str:
        """The field's type as a short name; a ``Literal`` of strings counts as ``str``, a list that
        may also be a word (``moe.layers``: ``"all"``) as its list type."""
        tp = _hint(self.owner, self.name)
        if get_origin(tp) is Literal:
            return "str"
        if get_origin(tp) in (Union, types.UnionType):
            lists = [a for a in get_args(tp) if get_origin(a) is list]
            if lists:
                return str(lists[0])
        return tp.__name__ if isinstance(tp, type) and get_origin(tp) is None else str(tp)

    @property
    def is_list(self) -> bool:
        return self.kind.startswith("list[")

    @property
    def words(self) -> tuple[str, ...]:
        """Strings a list key may be instead of a list (``moe.layers``: ``all``)."""
        tp = _hint(self.owner, self.name)
        if get_origin(tp) not in (Union, types.UnionType):
            return ()
        return tuple(w for a in get_args(tp) if get_origin(a) is Literal for w in get_args(a))

    def holder(self, cfg: RunConfig) -> Any:
        part = getattr(cfg, self.part)
        return getattr(part, self.section) if self.section else part

    def get(self, cfg: RunConfig) -> Any:
        return getattr(self.holder(cfg), self.name)


@cache
def _hint(cls: type, name: str) -> Any:
    return get_type_hints(cls)[name]


@cache
def config_keys() -> tuple[Key, ...]:
    """Every key, in the order of ``fractalformer config`` and ``--print-config``."""
    out = []
    for part, cls in (("model", ModelConfig), ("train", TrainConfig)):
        for f in fields(cls):
            if part == "model" and f.name in SECTIONS:
                section = SECTIONS[f.name]
                out += [Key(part, f.name, sf.name, sf.metadata.get("flat") or sf.name, section, sf)
                        for sf in fields(section)]
            else:
                out.append(Key(part, "", f.name, f.name, cls, f))
    return tuple(out)


@cache
def _key_names() -> dict[str, Key]:
    names: dict[str, Key] = {}
    for k in config_keys():
        for name in {k.flat, k.dotted, f"{k.part}.{k.flat}", f"{k.part}.{k.dotted}"}:
            assert names.setdefault(name, k) is k, f"config key name {name!r} is ambiguous"
    return names


def find_key(name: str) -> Key:
    """The key of a flat (``n_experts``), dotted (``moe.n_experts``) or qualified (``model.moe.n_experts``,
    ``train.lr``) name."""
    k = _key_names().get(name.strip())
    if k is None:
        known = sorted(k.flat for k in config_keys())
        raise FractalError(f"unknown config key {name!r}; known keys: {', '.join(known)}")
    return k


def get_value(cfg: RunConfig, name: str) -> Any:
    return find_key(name).get(cfg)


def _label(obj: Any, name: str) -> str:
    """The flat name of field ``name`` of ``obj``: what error messages call a key."""
    return next((f.metadata.get("flat") or f.name for f in fields(obj) if f.name == name), name)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if not getattr(obj, n) > 0:
            raise FractalError(f"{_label(obj, n)} must be positive, got {getattr(obj, n)}")


def _nonnegative(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 0:
            raise FractalError(f"{_label(obj, n)} must not be negative, got {getattr(obj, n)}")


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The options of a ``Literal[...]`` config field (empty for any other field)."""
    tp = _hint(cls, name)
    return get_args(tp) if get_origin(tp) is Literal else ()


def _check_choices(obj: Any) -> None:
    for part in (obj, *(obj.sections().values() if isinstance(obj, ModelConfig) else ())):
        for f in fields(part):
            options = choices(type(part), f.name)
            if options and getattr(part, f.name) not in options:
                raise FractalError(f"{_label(part, f.name)} must be one of {', '.join(options)}; "
                                   f"got {getattr(part, f.name)!r}")


def check_tokenizer_name(name: str) -> None:
    """Reject a tokenizer name that ``data.tokenizers.get_tokenizer`` would not know."""
    m = re.fullmatch(r"bpe:(\S*)", name)
    if m is not None:
        if not re.fullmatch(r"[0-9]+", m.group(1)) or not 256 <= int(m.group(1)) <= 1_000_000:
            raise FractalError(f"tokenizer bpe:N needs N from 256 (the byte alphabet) to 1000000, "
                               f"got {name!r}")
    elif name not in ("bpe128", "char", "byte", "gpt2"):
        raise FractalError(f"unknown tokenizer: tokenizer must be one of bpe128, char, byte, bpe:N, gpt2; "
                           f"got {name!r}")


def _list(k: Key, value: Any, given: str, strict_types: bool) -> list | str:
    """A list key's value: a list, one of its words, a lone number (as a list of one) or - from
    ``--set``, or for keys once stored as strings from anywhere - its string form."""
    item = int if k.kind == "list[int]" else float
    meta = k.spec.metadata
    if isinstance(value, str) and value.strip() in k.words:
        return value.strip()
    if isinstance(value, str) and (meta["strings"] or not strict_types):
        raw = value.strip()
        try:
            value = [item(x) for x in raw.split(meta["sep"])] if raw else []
        except ValueError:
            raise FractalError(f"{given} must be {meta['form']}, got {value!r}") from None
    elif meta["strings"] and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    types_ok = (int,) if item is int else (int, float)
    if not isinstance(value, list) or any(isinstance(x, bool) or not isinstance(x, types_ok) for x in value):
        words = "".join(f" or {w!r}" for w in k.words)
        raise FractalError(f"{given} must be a list of {'integers' if item is int else 'numbers'}{words}, "
                           f"got {value!r}")
    if not all(math.isfinite(x) for x in value):
        raise FractalError(f"{given} must be finite numbers, got {value!r}")
    return [item(x) for x in value]


def _coerce(k: Key, value: Any, given: str, strict_types: bool) -> Any:
    kind = k.kind
    if k.is_list:
        return _list(k, value, given, strict_types)
    if isinstance(value, str) and not strict_types:
        raw = value.strip()
        if kind == "bool":
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise FractalError(f"{given} must be true or false, got {value!r}")
        if "None" in kind and raw.lower() in ("none", "null", ""):
            return None
        if kind == "int":
            try:
                return int(raw)
            except ValueError:
                raise FractalError(f"{given} must be an integer, got {value!r}") from None
        if kind == "float":
            try:
                value = float(raw)
            except ValueError:
                raise FractalError(f"{given} must be a number, got {value!r}") from None
        else:
            return raw
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "str | None": value is None or isinstance(value, str),
    }.get(kind, True)
    if not ok:
        raise FractalError(f"{given} must be of type {kind}, got {value!r}")
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise FractalError(f"{given} must be finite, got {value}")
    return value


def apply_overrides(cfg: RunConfig, values: dict[str, Any], strict_types: bool = False) -> None:
    """Set ``key: value`` pairs (any name :func:`find_key` knows) on ``cfg``; ``strict_types``: the
    values are typed (TOML, JSON, presets), else strings from ``--set``."""
    for given, value in values.items():
        k = find_key(given)
        setattr(k.holder(cfg), k.name, _coerce(k, value, given, strict_types))


def parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise FractalError(f"a setting is key=value, got {item!r}")
        out[name.strip()] = value
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted names: ``{"model": {"moe": {"topk": 4}}}`` -> ``model.moe.topk``."""
    out: dict[str, Any] = {}
    for name, value in d.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = value
    return out


def load_toml(path: str) -> dict[str, Any]:
    """The ``key: value`` pairs of a TOML file; tables (``[model]``, ``[model.moe]``, ``[train]``)
    give dotted names."""
    p = Path(path)
    if not p.is_file():
        raise FractalError(f"config file not found: {path}")
    try:
        return _flatten(tomllib.loads(p.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FractalError(f"config file {path} is not valid TOML: {e}") from None


def build_config(
    preset: str | None = None, toml_path: str | None = None, sets: list[str] | None = None
) -> RunConfig:
    """Preset, then TOML file, then ``--set`` overrides; validated.

    The base is ``preset``, else the TOML file's own ``preset = "..."`` key, else ``default``
    (the FractalFormer); naming two different presets is an error.
    """
    values = load_toml(toml_path) if toml_path else {}
    named = values.pop("preset", None)
    if named is not None and not isinstance(named, str):
        raise FractalError(f"{toml_path}: preset must be a string, got {named!r}")
    if preset is not None and named is not None and named != preset:
        raise FractalError(f"preset {preset!r} and the config file's preset {named!r} disagree; name one")
    base = preset or named or "default"
    if base not in PRESETS:
        raise FractalError(f"unknown preset {base!r}; choose one of {', '.join(PRESETS)}")
    cfg = RunConfig()
    apply_overrides(cfg, PRESETS[base], strict_types=True)
    apply_overrides(cfg, values, strict_types=True)
    apply_overrides(cfg, parse_set(sets or []))
    cfg.validate()
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: RunConfig) -> str:
    """``cfg`` as a TOML file that ``--config`` reads back on any preset: every key, the sections in
    tables of their own (unset keys, TOML having no null, are comments saying what unset means)."""
    unset = {"data": "the shipped TinyShakespeare", "init_from": "training starts from fresh weights"}
    out = []
    for table in ("model", *(f"model.{s}" for s in SECTIONS), "train"):
        section = SECTIONS.get(table.removeprefix("model."))
        if section is not None and cfg.model.family not in section.FAMILIES:
            out.append(f"# family {' / '.join(section.FAMILIES)} only: here every key at its default")
        out.append(f"[{table}]")
        for k in config_keys():
            if f"{k.part}.{k.section}".rstrip(".") == table:
                v = k.get(cfg)
                out.append(f"# {k.name}: unset ({unset.get(k.name, 'its default')})" if v is None
                           else f"{k.name} = {_toml_value(v)}")
        out.append("")
    return "\n".join(out)


def describe_keys() -> list[tuple[str, str, str, str]]:
    """(part, key, default, description) for every config key, for ``fractalformer config``; ``key``
    is the dotted name, the description names the flat one where it differs."""
    defaults = RunConfig()
    rows = []
    for k in config_keys():
        about = k.spec.metadata["help"]
        options = choices(k.owner, k.name)
        if options:
            about += f" (one of {', '.join(options)})"
        if k.flat != k.dotted:
            about += f" [flat: {k.flat}]"
        v = k.get(defaults)
        rows.append((k.part, k.dotted, "unset" if v is None else _toml_value(v), about))
    return rows
