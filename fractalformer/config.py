"""Configuration: one dataclass for the model, one for training, presets, and parsing.

A run folder's ``config.json`` is ``{"model": {...}, "train": {...}, "tokenizer": {...}}``.
Every field can be set from a preset, a TOML file (flat keys or ``[model]`` /
``[train]`` tables) and ``--set key=value`` on the command line, in that order.
"""

from __future__ import annotations

import dataclasses
import json
import math

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

from .errors import FractalError

if TYPE_CHECKING:
    from collections.abc import Callable

    from .nn.nesting import Nesting


@dataclass
class ModelConfig:
    """Model dimensions and nesting. Defaults are the seed FractalFormer's (about 1M parameters).

    ``family`` picks the nesting: ``gpt`` (dense, one level), ``fractal`` (block nesting:
    split**l sub-models at level l), ``matformer`` (prefix nesting of every part) or
    ``mrl`` (dense body; only the final state and tied output are prefix-nested). ``moe`` is
    the dense GPT with product-key sparse layers (PEER, PKM or FHME) in place of the MLP.
    ``concept`` puts causal next-concept levels above the tokens (models/concept.py).
    """

    family: Literal["gpt", "fractal", "matformer", "mrl", "moe", "concept"] = "gpt"
    levels: int = 1  # nesting depth; level l sub-models are 1/split**l as wide
    split: int = 2
    attn_nesting: Literal["head_dim", "heads"] = "head_dim"  # all heads narrower, or whole heads
    residual: Literal["none", "upstream", "downstream"] = "none"  # fractal only: cross-level residuals
    residual_rank: int = 0  # 0: add states directly; r > 0: through a learned rank-r map
    glue_rank: int = 0  # fractal: rank-r maps between the level-1 blocks of every linear (merge glue)
    level_weights: list[float] = field(default_factory=list)  # loss weight per level; [] = all alike
    distill: float = 0.0  # nested sub-models' loss: (1 - distill) * CE + distill * KL(full || sub)
    vocab_size: int = 128
    block_size: int = 256  # context length
    token_window: int = 0  # > 0: token-level attention reads only the last token_window tokens
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4  # query heads
    n_kv_head: int = 1  # 1 = multi-query, n_head = multi-head, between = grouped-query
    head_dim: int = 32
    mlp_mult: float = 4.0  # GeGLU inner width = mlp_mult * d_model
    mlp_bias: bool = True
    rope_theta: float = 100.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    init_std: float = 0.02
    # family "moe" (models/moe.py): product-key sparse layers in place of the MLP
    moe: Literal["none", "peer", "pkm", "fhme"] = "none"  # the sparse layer; see docs/moe.md
    moe_layers: str = "all"  # "all" or comma-separated layer indices that get the sparse layer
    moe_with_mlp: bool = False  # keep the dense MLP beside the sparse layer (outputs added)
    n_experts: int = 65536  # N, a perfect square: experts (peer, fhme) or memory slots (pkm)
    moe_heads: int = 4  # retrieval heads h
    moe_topk: int = 8  # experts per head k (k <= sqrt(N))
    moe_key_dim: int = 128  # query / product-key width (two halves of key_dim / 2)
    moe_gate: Literal["softmax", "sigmoid", "relu"] = "softmax"  # routing weights from scores
    moe_query_norm: Literal["rms", "layer", "none"] = "rms"  # per-token query norm (never batch norm)
    moe_sparse: bool = False  # row-sparse table gradients, trained by SparseAdam
    fhme_depth: int = 3  # sub-blocks per fractal expert
    fhme_adaptive: bool = True  # learned per-token halting (ACT); false = always full depth
    halt_penalty: float = 0.1  # weight of the ponder cost (mean sub-blocks run / depth)
    # family "concept" (models/concept.py): causal concept levels above the tokens
    concept_levels: int = 1  # levels above the tokens; level k groups combo units of level k-1
    combo: str = "4"  # units per concept: one number for every level, or one per level ("4,4")
    combiner: Literal["sum", "linear"] = "sum"  # concept = RMSNorm(sum of units) or of linear(concat)
    concept_read: Literal["cross", "add"] = "cross"  # read the level above by cross-attention or addition
    concept_share: bool = False  # one stack of blocks for every level + a learned level embedding
    concept_layers: int = 0  # blocks per concept level (0 = n_layer; shared: the first ones)
    concept_loss: Literal["cosine", "mse", "l1"] = "cosine"  # next-concept regression loss
    concept_weight: str = "0.1"  # regression loss weight: one for every level or one per level
    concept_read_init: float = 0.0  # initial read_scale: 0 = the read path starts closed (the dense GPT)

    def combos(self) -> list[int]:
        """Units per concept at each concept level (level 1 first)."""
        vals = [int(x) for x in self.combo.split(",")]
        return vals * self.concept_levels if len(vals) == 1 else vals

    def concept_weights(self) -> list[float]:
        vals = [float(x) for x in self.concept_weight.split(",")]
        return vals * self.concept_levels if len(vals) == 1 else vals

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_mult * self.d_model)

    def nesting(self) -> Nesting:
        from .nn.nesting import Nesting

        return Nesting("prefix" if self.family in ("matformer", "mrl") else "block", self.levels, self.split)

    def sub_models(self) -> list[tuple[int, int]]:
        """Every (level, index), level by level - the order of per-sub-model losses."""
        nest = self.nesting()
        return [(lv, j) for lv in range(self.levels) for j in range(nest.count(lv))]

    def sub_model_weights(self) -> list[float]:
        """Loss weight of every sub-model; they sum to 1.

        Default: every sub-model weighs the same (the seed summed plain cross-entropies;
        this is that sum divided by the count), so each weight entry gets an equal share of
        gradient from every sub-model that owns it.
        """
        subs = self.sub_models()
        per_level = self.level_weights or None
        raw = [per_level[lv] / sum(1 for s in subs if s[0] == lv) if per_level else 1.0 for lv, _ in subs]
        return [w / sum(raw) for w in raw]

    def validate(self) -> None:
        _check_choices(self)
        _positive(self, "vocab_size", "block_size", "n_layer", "d_model", "n_head", "n_kv_head",
                  "head_dim", "mlp_mult", "rope_theta", "norm_eps", "init_std", "levels")
        _nonnegative(self, "residual_rank", "glue_rank")
        self._validate_nesting()
        if self.n_head % self.n_kv_head:
            raise FractalError(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )
        if self.head_dim % 2:
            raise FractalError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise FractalError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.mlp_hidden < 1:
            raise FractalError("mlp_mult * d_model must be at least 1")
        self._validate_moe()
        self._validate_concept()
        if not 0 <= self.token_window <= self.block_size:
            raise FractalError(f"token_window must be between 0 (the whole block_size) and block_size "
                               f"{self.block_size}, got {self.token_window}")
        if self.token_window and (self.family not in ("gpt", "concept") or self.concept_share):
            raise FractalError("token_window needs family gpt, or concept with separate weights "
                               "(shared blocks also run the concept levels)")

    def _validate_concept(self) -> None:
        if self.family != "concept":
            changed = [f.name for f in fields(self) if f.name in _CONCEPT_KEYS
                       and getattr(self, f.name) != f.default]
            if changed:
                raise FractalError(f"{changed[0]} needs family=concept (got family {self.family})")
            return
        _positive(self, "concept_levels")
        _nonnegative(self, "concept_layers")
        if self.concept_share and self.concept_layers > self.n_layer:
            raise FractalError(f"concept_share runs the concept levels on the first concept_layers of the "
                               f"{self.n_layer} shared blocks; got concept_layers {self.concept_layers}")
        combos = self._per_level("combo", self.combos, "an integer or comma-separated integers",
                                 " (one per concept level), each at least 2", lambda c: c < 2)
        self._per_level("concept_weight", self.concept_weights, "a number or comma-separated numbers",
                        ", each >= 0", lambda w: w < 0 or not math.isfinite(w))
        span = math.prod(combos)
        if self.block_size < span:
            raise FractalError(f"block_size {self.block_size} does not cover one top-level concept of "
                               f"{span} tokens (the product of combo {self.combo!r})")

    def _per_level(self, key: str, parse: Callable[[], list], kind: str, each: str,
                   bad: Callable[[Any], bool]) -> list:
        """The values of a per-concept-level list key (``combo``, ``concept_weight``): one, or one per
        level, none of them ``bad``; else a one-line error naming ``kind`` and ``each``."""
        try:
            vals = parse()
        except ValueError:
            raise FractalError(f"{key} must be {kind}, got {getattr(self, key)!r}") from None
        if len(vals) != self.concept_levels or any(bad(v) for v in vals):
            raise FractalError(f"{key} needs one value, or {self.concept_levels}{each}; "
                               f"got {getattr(self, key)!r}")
        return vals

    def sparse_layers(self) -> list[int]:
        """Indices of the layers whose MLP is a sparse (product-key) layer."""
        if self.moe == "none":
            return []
        if self.moe_layers.strip() == "all":
            return list(range(self.n_layer))
        return sorted({int(x) for x in self.moe_layers.split(",")})

    def _validate_moe(self) -> None:
        if self.family == "moe" and self.moe == "none":
            raise FractalError("family moe needs a sparse layer: set moe to peer, pkm or fhme")
        if self.moe == "none":
            return
        if self.family != "moe":
            raise FractalError(f"moe={self.moe} cannot nest inside family {self.family}: an expert table "
                               f"has no width to split between sub-models (use family=moe, levels 1)")
        _positive(self, "n_experts", "moe_heads", "moe_topk", "moe_key_dim", "fhme_depth")
        _nonnegative(self, "halt_penalty")
        n = math.isqrt(self.n_experts)
        if n * n != self.n_experts:
            raise FractalError(f"n_experts must be a perfect square (product keys: sqrt(N) sub-keys per "
                               f"half), got {self.n_experts}; nearest: {n * n} or {(n + 1) ** 2}")
        if self.moe_topk > n:
            raise FractalError(f"moe_topk ({self.moe_topk}) must not exceed sqrt(n_experts) = {n}")
        if self.moe_key_dim % 2:
            raise FractalError(f"moe_key_dim must be even (two halves), got {self.moe_key_dim}")
        try:
            layers = self.sparse_layers()
        except ValueError:
            raise FractalError(f"moe_layers must be 'all' or comma-separated layer indices, "
                               f"got {self.moe_layers!r}") from None
        if not layers or any(not 0 <= i < self.n_layer for i in layers):
            raise FractalError(f"moe_layers must name layers in 0..{self.n_layer - 1}, "
                               f"got {self.moe_layers!r}")

    def _validate_nesting(self) -> None:
        if self.family == "gpt" and self.levels != 1:
            raise FractalError(f"family gpt is dense: levels must be 1, got {self.levels} "
                               "(use family=fractal, matformer or mrl for nesting)")
        if self.family in ("moe", "concept") and self.levels != 1:
            raise FractalError(f"family {self.family} is not nested: levels must be 1, got {self.levels} "
                               "(concept levels are concept_levels)")
        if self.family not in ("gpt", "moe", "concept") and self.levels < 2:
            raise FractalError(f"family {self.family} needs levels >= 2, got {self.levels}")
        if self.split < 2:
            raise FractalError(f"split must be at least 2, got {self.split}")
        if not 0.0 <= self.distill <= 1.0:
            raise FractalError(f"distill must lie in [0, 1], got {self.distill}")
        if self.distill and self.family in ("gpt", "mrl", "moe", "concept"):
            raise FractalError(f"distill needs nested sub-models with their own bodies (family fractal or "
                               f"matformer), not family {self.family}")
        if self.residual != "none" and self.family != "fractal":
            raise FractalError("cross-level residuals need family=fractal")
        if self.glue_rank and (self.family != "fractal" or self.residual != "none"):
            raise FractalError("glue_rank needs family=fractal without cross-level residuals")
        if self.level_weights:
            w = self.level_weights
            if len(w) != self.levels or any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
                raise FractalError(f"level_weights needs {self.levels} non-negative numbers with a "
                                   f"positive sum, got {self.level_weights!r}")
        if self.levels == 1:
            return
        f = self.split ** (self.levels - 1)
        smallest = f"split**(levels-1) = {f}"
        nested = {"d_model": self.d_model, "mlp hidden width": self.mlp_hidden}
        if self.family != "mrl":
            if self.attn_nesting == "heads":
                for name in ("n_head", "n_kv_head"):
                    if getattr(self, name) % f:
                        raise FractalError(f"attn_nesting=heads needs {name} ({getattr(self, name)}) "
                                           f"divisible by {smallest}")
            else:
                if self.head_dim % f or (self.head_dim // f) % 2:
                    raise FractalError(f"head_dim {self.head_dim} is too small to nest: it must be "
                                       f"divisible by {smallest} leaving an even (RoPE) head_dim, "
                                       f"got {self.head_dim / f:g}")
        for name, size in nested.items():
            if size % f:
                raise FractalError(f"{name} ({size}) is not divisible by {smallest}")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Defaults train the default model in ~10 min on 2 cores."""

    tokenizer: str = "bpe128"  # bpe128, char, byte, bpe:N or gpt2 (checked by tokenizers.check_name)
    data: str | None = None  # None = the shipped TinyShakespeare; a text file or a prepared folder
    init_from: str | None = None  # fine-tuning: start from this run's weights (and tokenizer)
    on_unknown: Literal["error", "replace"] = "error"  # or "replace": map unknown characters to a known one
    batch_size: int = 16  # rows of one optimizer step, over all processes and micro-batches
    grad_accum: int = 1  # micro-batches per step: batch_size / grad_accum rows at a time, same gradient
    sync_every: int = 10  # steps between host reads of the losses (also at evals, checkpoints, the end)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicated (DDP) or sharded (fully_shard)
    routing: Literal["shared", "split", "shard"] = "shared"  # nested models: see data.training_batch
    data_shard: str = ""  # "J/N": train on contiguous shard J of N of the training tokens ("" = all)
    freeze: Literal["none", "children"] = "none"  # children: level-1 sub-models' entries stay fixed (glue)
    schedule_start: int = 0  # the step where warmup + cosine begin (a merged or grown run's new schedule)
    max_steps: int = 1400
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    table_lr: float = 0.0  # peak lr of expert / memory tables (0 = lr); follows the same schedule
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    threads: int = 0  # CPU threads on this machine, split among its processes; 0: auto
    # validation windows scored after training: -1 as many as trained on (max_steps x batch_size,
    # at most the whole split), 0 none, N the first N
    final_eval: int = -1
    sample_tokens: int = 200  # length of the sample printed after training
    log: Literal["csv", "tensorboard"] = "csv"  # tensorboard: also scalars in RUN/tensorboard (the extra)
    groups: str = ""  # imposed token groups per width: "" none, "seed", or a JSON file
    emergent_every: int = 0  # re-cluster the embedding into groups every N steps (0 = never)
    cluster_method: Literal["dbscan", "agglomerative"] = "dbscan"  # or "agglomerative"
    cluster_eps: float = 0.1  # cosine distance (DBSCAN eps / agglomerative threshold)
    cluster_min_samples: int = 3

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
        from .data.tokenizers import check_name

        check_name(self.tokenizer)

    def shard(self) -> tuple[int, int]:
        """``data_shard`` as (J, N); (0, 1) when training on all the data."""
        if not self.data_shard:
            return 0, 1
        j, slash, n = self.data_shard.partition("/")
        if not (slash and j.strip().isdigit() and n.strip().isdigit() and 0 <= int(j) < int(n)):
            raise FractalError(f"data_shard must be 'J/N' with 0 <= J < N, got {self.data_shard!r}")
        return int(j), int(n)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        m, t = self.model, self.train
        if (t.groups or t.emergent_every) and m.levels == 1:
            raise FractalError("token groups (groups / emergent_every) need a nested model: their loss "
                               "applies to the narrower sub-models")
        if t.freeze != "none" and (m.family != "fractal" or m.residual != "none"):
            raise FractalError("freeze=children needs a FractalFormer without cross-level residuals "
                               "(family=fractal, residual=none): its level-1 sub-models are the children")
        if t.routing != "shared":
            if t.grad_accum > 1:
                raise FractalError(f"routing={t.routing} cannot combine with grad_accum: a micro-batch would "
                                   "re-split the sub-models' row blocks (use routing=shared)")
            if m.family == "mrl":
                raise FractalError("routing must be shared for family=mrl: its sizes share one body")
            if m.family in ("gpt", "moe", "concept"):
                raise FractalError(f"routing={t.routing} needs a nested model (family fractal, "
                                   "matformer or mrl)")
            if m.distill:
                raise FractalError(f"routing={t.routing} cannot combine with distill: the sub-models "
                                   "learn from the full model's predictions on the same rows")
            if m.residual != "none":
                raise FractalError(f"routing={t.routing} cannot combine with residual={m.residual}: "
                                   "cross-level residuals need every level on the same rows")
            n = m.nesting().count(m.levels - 1)
            if t.batch_size % n:
                raise FractalError(f"routing={t.routing} needs batch_size divisible by the {n} "
                                   f"sub-models of the last level, got {t.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": asdict(self.model), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
            raise FractalError("config must have a 'model' table")
        if not isinstance(d.get("train", {}), dict):
            raise FractalError("config's 'train' must be a table")
        model = dict(d["model"])
        if isinstance(model.get("level_weights"), str):  # run folders written before it was a list
            model["level_weights"] = _numbers(model["level_weights"], "level_weights", strict_types=False)
        cfg = cls()
        apply_overrides(cfg, {**model, **d.get("train", {})}, strict_types=True)
        return cfg


_TINY = dict(block_size=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, batch_size=8,
             max_steps=20, warmup_steps=2, eval_every=10, eval_batches=2, ckpt_every=10, sample_tokens=40)
PRESETS: dict[str, dict[str, Any]] = {
    # The FractalFormer: the seed's dims, 3 levels of block nesting (1 + 2 + 4 sub-models).
    # Whole-head nesting with 4 KV heads; half the loss on the full model (the rest shared
    # by the levels below): see docs/fractalformer.md for why.
    "default": dict(family="fractal", levels=3, split=2, attn_nesting="heads", n_kv_head=4,
                    level_weights=[2.0, 1.0, 1.0],
                    max_steps=700, eval_every=175, ckpt_every=175),
    # The seed FractalFormer's dimensions trained densely: the reference model.
    "dense": {},
    # A wider FractalFormer whose decode step is bound by reading weights, so its nested
    # drafts (width 256 and 128) are much cheaper than the full model: speculative decoding.
    # Trained in bf16 autocast (2.5x faster than fp32 on an AVX512-BF16 CPU), with
    # self-distillation so that the drafts agree with the full model (docs/speculative.md).
    "fractal-512": dict(family="fractal", levels=3, split=2, attn_nesting="heads", d_model=512, n_head=8,
                        n_kv_head=4, head_dim=64, distill=0.5, batch_size=8, dtype="bfloat16",
                        max_steps=1500, lr=1e-3, min_lr=1e-4, eval_every=250, ckpt_every=250),
    # The seed matryoshkaGPT: char tokens, d 32, an MRL head at widths 32/16/8/4/2.
    "matryoshka": dict(family="mrl", levels=5, split=2, tokenizer="char", vocab_size=65, d_model=32,
                       n_layer=4, n_head=4, n_kv_head=4, head_dim=8, block_size=128, batch_size=32,
                       max_steps=1500, eval_every=250, ckpt_every=500),
    # Product-key sparse layers in place of the MLP (models/moe.py, docs/moe.md): the dense
    # reference's dims and schedule; the sparse layer in layers 1 and 3.
    "peer": dict(family="moe", moe="peer", moe_layers="1,3", n_experts=65536, moe_heads=4, moe_topk=8),
    "pkm": dict(family="moe", moe="pkm", moe_layers="1,3", n_experts=65536, moe_heads=4, moe_topk=8),
    "fhme": dict(family="moe", moe="fhme", moe_layers="1,3", n_experts=16384, moe_heads=4, moe_topk=8,
                 fhme_depth=3),
    # Next-concept levels above the tokens (models/concept.py, docs/concept.md): the dense
    # reference's dims and schedule for the token level; one concept per 4 tokens, and per
    # 16 tokens, each a causal transformer read by cross-attention from the level below.
    # One stack of blocks serves every level (with a level embedding): the best row of the
    # ablation (-0.096 bits/char against separate weights at 300 steps, 39% of the parameters).
    "concept": dict(family="concept", concept_levels=2, combo="4", combiner="linear", concept_share=True),
    # On UTF-8 bytes (no tokenizer): concepts of 4, 16 and 64 bytes; 512-byte windows, batch 8,
    # so a step reads the dense reference's 4,096 units. Lean: 2 shared blocks for
    # the bytes, the first of them for each concept level, plans added - 0.63x a dense byte
    # step's FLOPs; at equal FLOPs 2.42-2.46 bits/byte against 4-block dense byte's 2.66-2.68.
    "concept-byte": dict(family="concept", tokenizer="byte", vocab_size=256, concept_levels=3, combo="4",
                         combiner="linear", block_size=512, batch_size=8, concept_share=True, n_layer=2,
                         concept_layers=1, concept_read="add"),
    # Few-thousand-parameter models for tests and smoke runs.
    "tiny": _TINY,
    "tiny-fractal": {**_TINY, "family": "fractal", "levels": 3, "n_kv_head": 4, "attn_nesting": "heads"},
    # A 10.4M-parameter FractalFormer (1 + 2 + 4 sub-models) for corpora beyond TinyShakespeare:
    # a 4096-token byte-level BPE; python -m bench.bench_10m trains it on a prepared corpus.
    "10m": dict(family="fractal", levels=3, split=2, attn_nesting="heads", d_model=384, n_layer=4, n_head=8,
                n_kv_head=4, head_dim=48, tokenizer="bpe:4096", vocab_size=4096, batch_size=16, lr=1e-3,
                min_lr=1e-4, max_steps=2000, eval_every=250, ckpt_every=250),
}


_CONCEPT_KEYS = ("concept_levels", "combo", "combiner", "concept_read", "concept_share", "concept_layers",
                 "concept_loss", "concept_weight", "concept_read_init")


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if not getattr(obj, n) > 0:
            raise FractalError(f"{n} must be positive, got {getattr(obj, n)}")


def _nonnegative(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 0:
            raise FractalError(f"{n} must not be negative, got {getattr(obj, n)}")


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The options of a ``Literal[...]`` config field (empty for any other field)."""
    tp = get_type_hints(cls)[name]
    return get_args(tp) if get_origin(tp) is Literal else ()


def _check_choices(obj: Any) -> None:
    for f in fields(obj):
        options = choices(type(obj), f.name)
        if options and getattr(obj, f.name) not in options:
            raise FractalError(f"{f.name} must be one of {', '.join(options)}; got {getattr(obj, f.name)!r}")


def _field_owner(cfg: RunConfig, key: str) -> tuple[Any, dataclasses.Field]:
    section, _, name = key.rpartition(".")
    parts = [cfg.model, cfg.train] if not section else [getattr(cfg, section, None)]
    for part in parts:
        if part is None:
            break
        for f in fields(part):
            if f.name == name:
                return part, f
    known = sorted(f.name for part in (cfg.model, cfg.train) for f in fields(part))
    raise FractalError(f"unknown config key {key!r}; known keys: {', '.join(known)}")


def _kind(owner: Any, f: dataclasses.Field) -> str:
    """The field's type as a short name; a ``Literal`` of strings counts as ``str``."""
    tp = get_type_hints(type(owner))[f.name]
    if get_origin(tp) is Literal:
        return "str"
    return tp.__name__ if isinstance(tp, type) and get_origin(tp) is None else str(tp)


def _numbers(value: Any, key: str, strict_types: bool) -> list[float]:
    """A list of finite numbers, from a list or (``--set`` only) "1,2,1"."""
    if isinstance(value, str) and not strict_types:
        try:
            value = [float(x) for x in value.split(",")] if value.strip() else []
        except ValueError:
            raise FractalError(f"{key} must be comma-separated numbers, got {value!r}") from None
    if not isinstance(value, list) or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                          for x in value):
        raise FractalError(f"{key} must be a list of numbers, got {value!r}")
    if not all(math.isfinite(x) for x in value):
        raise FractalError(f"{key} must be finite numbers, got {value!r}")
    return [float(x) for x in value]


def _coerce(owner: Any, f: dataclasses.Field, value: Any, key: str, strict_types: bool) -> Any:
    kind = _kind(owner, f)
    if kind == "list[float]":
        return _numbers(value, key, strict_types)
    if isinstance(value, str) and not strict_types:
        raw = value.strip()
        if kind == "bool":
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise FractalError(f"{key} must be true or false, got {value!r}")
        if "None" in kind and raw.lower() in ("none", "null", ""):
            return None
        if kind == "int":
            try:
                return int(raw)
            except ValueError:
                raise FractalError(f"{key} must be an integer, got {value!r}") from None
        if kind == "float":
            try:
                value = float(raw)
            except ValueError:
                raise FractalError(f"{key} must be a number, got {value!r}") from None
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
        raise FractalError(f"{key} must be of type {kind}, got {value!r}")
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise FractalError(f"{key} must be finite, got {value}")
    return value


def apply_overrides(cfg: RunConfig, values: dict[str, Any], strict_types: bool = False) -> None:
    """Set ``key: value`` pairs (``key`` or ``model.key`` / ``train.key``) on ``cfg``."""
    for key, value in values.items():
        owner, f = _field_owner(cfg, key)
        setattr(owner, f.name, _coerce(owner, f, value, key, strict_types))


def parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise FractalError(f"a setting is key=value, got {item!r}")
        out[key.strip()] = value
    return out


def load_toml(path: str) -> dict[str, Any]:
    """Flat ``key: value`` pairs of a TOML file (``[model]`` / ``[train]`` keys as ``model.key``)."""
    p = Path(path)
    if not p.is_file():
        raise FractalError(f"config file not found: {path}")
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FractalError(f"config file {path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "train"):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def init_model_config(cfg: RunConfig, init: RunConfig, given: dict[str, Any]) -> RunConfig:
    """Fine-tuning: the model config of the run started from, under ``cfg``'s training config;
    model keys set explicitly (``given``) still apply (a changed shape fails at loading)."""
    out = RunConfig(dataclasses.replace(init.model), cfg.train)
    model_keys = {f.name for f in fields(ModelConfig)}
    apply_overrides(out, {k: v for k, v in given.items() if k.rpartition(".")[2] in model_keys
                          and k.rpartition(".")[0] in ("", "model")})
    out.validate()
    return out


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
    """``cfg`` as a TOML file that ``--config`` reads back (unset keys, TOML having no null, are
    comments saying what unset means)."""
    unset = {"data": "the shipped TinyShakespeare", "init_from": "training starts from fresh weights"}
    out = []
    for section, part in (("model", cfg.model), ("train", cfg.train)):
        out.append(f"[{section}]")
        for f in fields(part):
            v = getattr(part, f.name)
            out.append(f"# {f.name}: unset ({unset.get(f.name, 'its default')})" if v is None
                       else f"{f.name} = {_toml_value(v)}")
        out.append("")
    return "\n".join(out)


def describe_keys() -> list[tuple[str, str, str, str]]:
    """(section, key, default, description) for every config key, for ``fractalformer config --list``."""
    from .config_help import KEY_HELP

    rows = []
    for section, part in (("model", ModelConfig()), ("train", TrainConfig())):
        for f in fields(part):
            options = choices(type(part), f.name)
            about = KEY_HELP.get(f.name, "")
            if options:
                about += f" (one of {', '.join(options)})"
            rows.append((section, f.name, _toml_value(getattr(part, f.name)) if getattr(part, f.name)
                         is not None else "unset", about))
    return rows
