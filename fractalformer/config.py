"""Configuration: one dataclass for the model, one for training, presets, and parsing.

A run folder's ``config.json`` is ``{"model": {...}, "train": {...}, "tokenizer": {...}}``.
Every field can be set from a preset, a TOML file (flat keys or ``[model]`` /
``[train]`` tables) and ``--set key=value`` on the command line, in that order.
"""

from __future__ import annotations

import dataclasses
import math

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FractalError

if TYPE_CHECKING:
    from .nn.nesting import Nesting


@dataclass
class ModelConfig:
    """Model dimensions and nesting. Defaults are the seed FractalFormer's (about 1M parameters).

    ``family`` picks the nesting: ``gpt`` (dense, one level), ``fractal`` (block nesting:
    split**l sub-models at level l), ``matformer`` (prefix nesting of every part) or
    ``mrl`` (dense body; only the final state and tied output are prefix-nested). ``moe`` is
    the dense GPT with product-key sparse layers (PEER, PKM or FHME) in place of the MLP.
    """

    family: str = "gpt"
    levels: int = 1  # nesting depth; level l sub-models are 1/split**l as wide
    split: int = 2
    attn_nesting: str = "head_dim"  # "head_dim": all heads, narrower; "heads": blocks of whole heads
    residual: str = "none"  # fractal only: "upstream", "downstream" cross-level residuals
    residual_rank: int = 0  # 0: add states directly; r > 0: through a learned rank-r map
    glue_rank: int = 0  # fractal: rank-r maps between the level-1 blocks of every linear (merge glue)
    level_weights: str = ""  # comma-separated loss weight per level; "" = every sub-model alike
    distill: float = 0.0  # nested sub-models' loss: (1 - distill) * CE + distill * KL(full || sub)
    vocab_size: int = 128
    block_size: int = 256  # context length
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
    moe: str = "none"  # peer (single-neuron experts), pkm (value memory), fhme (fractal experts)
    moe_layers: str = "all"  # "all" or comma-separated layer indices that get the sparse layer
    moe_with_mlp: bool = False  # keep the dense MLP beside the sparse layer (outputs added)
    n_experts: int = 65536  # N, a perfect square: experts (peer, fhme) or memory slots (pkm)
    moe_heads: int = 4  # retrieval heads h
    moe_topk: int = 8  # experts per head k (k <= sqrt(N))
    moe_key_dim: int = 128  # query / product-key width (two halves of key_dim / 2)
    moe_gate: str = "softmax"  # routing weights from scores: softmax, sigmoid, relu
    moe_query_norm: str = "rms"  # per-token query norm: rms, layer, none (never batch norm)
    moe_sparse: bool = False  # row-sparse table gradients, trained by SparseAdam
    fhme_depth: int = 3  # sub-blocks per fractal expert
    fhme_adaptive: bool = True  # learned per-token halting (ACT); false = always full depth
    halt_penalty: float = 0.1  # weight of the ponder cost (mean sub-blocks run / depth)

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
        per_level = [float(w) for w in self.level_weights.split(",")] if self.level_weights else None
        raw = [per_level[lv] / sum(1 for s in subs if s[0] == lv) if per_level else 1.0 for lv, _ in subs]
        return [w / sum(raw) for w in raw]

    def validate(self) -> None:
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

    def sparse_layers(self) -> list[int]:
        """Indices of the layers whose MLP is a sparse (product-key) layer."""
        if self.moe == "none":
            return []
        if self.moe_layers.strip() == "all":
            return list(range(self.n_layer))
        return sorted({int(x) for x in self.moe_layers.split(",")})

    def _validate_moe(self) -> None:
        _choice(self, "moe", ("none", "peer", "pkm", "fhme"))
        if self.family == "moe" and self.moe == "none":
            raise FractalError("family moe needs a sparse layer: set moe to peer, pkm or fhme")
        if self.moe == "none":
            return
        if self.family != "moe":
            raise FractalError(f"moe={self.moe} cannot nest inside family {self.family}: an expert table "
                               f"has no width to split between sub-models (use family=moe, levels 1)")
        _choice(self, "moe_gate", ("softmax", "sigmoid", "relu"))
        _choice(self, "moe_query_norm", ("rms", "layer", "none"))
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
        _choice(self, "family", ("gpt", "fractal", "matformer", "mrl", "moe"))
        _choice(self, "attn_nesting", ("head_dim", "heads"))
        _choice(self, "residual", ("none", "upstream", "downstream"))
        if self.family == "gpt" and self.levels != 1:
            raise FractalError(f"family gpt is dense: levels must be 1, got {self.levels} "
                               "(use family=fractal, matformer or mrl for nesting)")
        if self.family == "moe" and self.levels != 1:
            raise FractalError(f"family moe is not nested: levels must be 1, got {self.levels}")
        if self.family not in ("gpt", "moe") and self.levels < 2:
            raise FractalError(f"family {self.family} needs levels >= 2, got {self.levels}")
        if self.split < 2:
            raise FractalError(f"split must be at least 2, got {self.split}")
        if not 0.0 <= self.distill <= 1.0:
            raise FractalError(f"distill must lie in [0, 1], got {self.distill}")
        if self.distill and self.family in ("gpt", "mrl", "moe"):
            raise FractalError(f"distill needs nested sub-models with their own bodies (family fractal or "
                               f"matformer), not family {self.family}")
        if self.residual != "none" and self.family != "fractal":
            raise FractalError("cross-level residuals need family=fractal")
        if self.glue_rank and (self.family != "fractal" or self.residual != "none"):
            raise FractalError("glue_rank needs family=fractal without cross-level residuals")
        if self.level_weights:
            try:
                w = [float(x) for x in self.level_weights.split(",")]
            except ValueError:
                raise FractalError(f"level_weights must be comma-separated numbers, got "
                                   f"{self.level_weights!r}") from None
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

    tokenizer: str = "bpe128"
    data: str | None = None  # None = the shipped TinyShakespeare
    on_unknown: str = "error"  # or "replace": map unknown characters to a known one
    batch_size: int = 16
    routing: str = "shared"  # nested models: shared, split or shard (see data.training_batch)
    data_shard: str = ""  # "J/N": train on contiguous shard J of N of the training tokens ("" = all)
    freeze: str = "none"  # "children": entries the level-1 sub-models own stay fixed (merge glue)
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
    device: str = "auto"  # auto, cpu, cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16
    compile: bool = False
    sample_tokens: int = 200  # length of the sample printed after training
    groups: str = ""  # imposed token groups per width: "" none, "seed", or a JSON file
    emergent_every: int = 0  # re-cluster the embedding into groups every N steps (0 = never)
    cluster_method: str = "dbscan"  # or "agglomerative"
    cluster_eps: float = 0.1  # cosine distance (DBSCAN eps / agglomerative threshold)
    cluster_min_samples: int = 3

    def validate(self) -> None:
        _positive(self, "batch_size", "max_steps", "lr", "eval_every", "eval_batches", "ckpt_every")
        _nonnegative(self, "table_lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "sample_tokens")
        if self.min_lr > self.lr:
            raise FractalError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FractalError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        _choice(self, "on_unknown", ("error", "replace"))
        _choice(self, "device", ("auto", "cpu", "cuda"))
        _choice(self, "routing", ("shared", "split", "shard"))
        _choice(self, "freeze", ("none", "children"))
        _nonnegative(self, "schedule_start")
        if self.schedule_start >= self.max_steps:
            raise FractalError(f"schedule_start ({self.schedule_start}) must be below max_steps "
                               f"({self.max_steps})")
        self.shard()
        _choice(self, "cluster_method", ("dbscan", "agglomerative"))
        if not 0 <= self.seed < 2**31:
            raise FractalError(f"seed must lie in [0, 2**31), got {self.seed}")
        _nonnegative(self, "emergent_every")
        _positive(self, "cluster_eps", "cluster_min_samples")
        _choice(self, "dtype", ("auto", "float32", "bfloat16"))
        from .tokenizers import TOKENIZERS

        _choice(self, "tokenizer", TOKENIZERS)


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
            if m.family == "mrl":
                raise FractalError("routing must be shared for family=mrl: its sizes share one body")
            if m.family in ("gpt", "moe"):
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
        cfg = cls()
        apply_overrides(cfg, {**d.get("model", {}), **d.get("train", {})}, strict_types=True)
        return cfg


_TINY = dict(block_size=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, batch_size=8,
             max_steps=20, warmup_steps=2, eval_every=10, eval_batches=2, ckpt_every=10, sample_tokens=40)
PRESETS: dict[str, dict[str, Any]] = {
    # The FractalFormer: the seed's dims, 3 levels of block nesting (1 + 2 + 4 sub-models).
    # Whole-head nesting with 4 KV heads: see docs/fractalformer.md for why.
    "default": dict(family="fractal", levels=3, split=2, attn_nesting="heads", n_kv_head=4,
                    max_steps=500, eval_every=100, ckpt_every=100),
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
    # Few-thousand-parameter models for tests and smoke runs.
    "tiny": _TINY,
    "tiny-fractal": {**_TINY, "family": "fractal", "levels": 3, "n_kv_head": 4, "attn_nesting": "heads"},
}


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if not getattr(obj, n) > 0:
            raise FractalError(f"{n} must be positive, got {getattr(obj, n)}")


def _nonnegative(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 0:
            raise FractalError(f"{n} must not be negative, got {getattr(obj, n)}")


def _choice(obj: Any, name: str, options: tuple[str, ...]) -> None:
    if getattr(obj, name) not in options:
        raise FractalError(f"{name} must be one of {', '.join(options)}; got {getattr(obj, name)!r}")


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


def _coerce(f: dataclasses.Field, value: Any, key: str, strict_types: bool) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
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
        setattr(owner, f.name, _coerce(f, value, key, strict_types))


def parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise FractalError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value
    return out


def load_toml(path: str) -> dict[str, Any]:
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


def build_config(
    preset: str | None = None, toml_path: str | None = None, sets: list[str] | None = None
) -> RunConfig:
    """Preset, then TOML file, then ``--set`` overrides; validated."""
    if preset is not None and preset not in PRESETS:
        raise FractalError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = RunConfig()
    apply_overrides(cfg, PRESETS[preset or "default"], strict_types=True)
    if toml_path:
        apply_overrides(cfg, load_toml(toml_path), strict_types=True)
    apply_overrides(cfg, parse_set(sets or []))
    cfg.validate()
    return cfg
