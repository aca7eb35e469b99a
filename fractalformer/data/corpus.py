"""Text corpora as token arrays: loading, on-disk token cache, train/val split, batches.

The split follows the seeds: the first 90% of the tokens train, the last 10% validate.
Batches are random windows of ``T + 1`` tokens drawn from a generator seeded by
``(seed, step)``, so the batch of any step can be recomputed without carrying RNG
state around - resuming a run or sharding it over DDP ranks sees the same data.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import FractalError
from ..io import atomic_write, cache_dir
from .prepared import load_prepared
from .tokenizers import TRAIN_FRACTION, Tokenizer

SHIPPED = "tinyshakespeare"
UNKNOWN_WARN = 0.01  # replacing more than this share of a training text's characters warns


def read_text(path: str | None) -> str:
    """The training text: the shipped TinyShakespeare when ``path`` is None."""
    if path is None or path == SHIPPED:
        return resources.files("fractalformer").joinpath("assets", "tinyshakespeare.txt").read_text(
            encoding="utf-8"
        )
    p = Path(path)
    if not p.is_file():
        raise FractalError(f"data file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FractalError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
    if not text:
        raise FractalError(f"data file {path} is empty")
    return text


def encode_cached(text: str, tok: Tokenizer, on_unknown: str = "error") -> np.ndarray:
    """Encode ``text``, reusing ids cached on disk under (text hash, tokenizer) as key."""
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
    spec = hashlib.sha256(repr(sorted(tok.to_dict().items())).encode()).hexdigest()[:12]
    path = cache_dir() / f"{key}-{tok.name}-{spec}-{on_unknown}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError):
            pass  # a damaged cache entry is rebuilt below
    ids = tok.encode_array(text, on_unknown).astype(np.int32 if tok.vocab_size > 65535 else np.uint16)
    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            np.save(out, ids, allow_pickle=False)

    try:
        atomic_write(path, write)
    except FractalError:
        pass  # caching is an optimisation; a read-only home must not stop training
    return ids


Ids = torch.Tensor | np.ndarray  # in memory, or memory-mapped prepared data (``data/prepared.py``)


def as_tensor(ids: Ids) -> torch.Tensor:
    """int64 tensor of (a slice of) token ids, reading a memory map only where sliced."""
    return ids if isinstance(ids, torch.Tensor) else torch.from_numpy(np.asarray(ids, dtype=np.int64))


@dataclass
class Corpus:
    """Token ids of one text split 90/10, with the units-per-token needed for BPC."""

    train: Ids
    val: Ids
    val_units_per_token: float  # characters (bytes for the byte tokenizer) per token
    unit: str = "char"
    sha256: str = ""  # of the text: a run records it, so a changed file is noticed

    @classmethod
    def prepared(cls, path: str, block_size: int) -> tuple[Tokenizer, Corpus]:
        """The memory-mapped ids of a ``fractalformer prepare`` folder and their tokenizer."""
        m, tok, ids = load_prepared(path)
        n = int(m["train_count"])
        corpus = cls(ids[:n], ids[n:], float(m["val_units_per_token"]), m.get("unit", tok.unit), m["sha256"])
        corpus.check(block_size)
        return tok, corpus

    def check(self, block_size: int) -> None:
        for name, part in (("training", self.train), ("validation", self.val)):
            if len(part) < block_size + 1:
                raise FractalError(
                    f"the {name} split has {len(part)} tokens, fewer than block_size + 1 = "
                    f"{block_size + 1}; use a longer text or a smaller block_size"
                )

    @classmethod
    def build(cls, text: str, tok: Tokenizer, block_size: int, on_unknown: str = "error") -> Corpus:
        if on_unknown == "replace":
            unknown = tok.unknown_count(text)
            if unknown > UNKNOWN_WARN * len(text):
                share = unknown / len(text)
                warnings.warn(f"{unknown:,} of {len(text):,} characters ({share:.1%}) are not in the "
                              f"{tok.name} vocabulary and become {tok.replacement!r}; the char or byte "
                              f"tokenizer fits this text", stacklevel=2)
        ids = torch.from_numpy(encode_cached(text, tok, on_unknown).astype(np.int64))
        n = int(TRAIN_FRACTION * len(ids))
        train, val = ids[:n], ids[n:]
        cls(train, val, 1.0).check(block_size)
        units = tok.units(tok.decode(val.tolist()))
        return cls(train, val, units / len(val), tok.unit, text_sha256(text))


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def batch_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def get_batch(
    ids: Ids, batch_size: int, block_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: inputs and next-token targets, shape (B, T)."""
    starts = torch.randint(0, len(ids) - block_size, (batch_size,), generator=gen)
    offs = torch.arange(block_size + 1)
    win = as_tensor(ids[(starts[:, None] + offs).numpy()]) if isinstance(ids, np.ndarray) \
        else ids[starts[:, None] + offs]
    return win[:, :-1], win[:, 1:]


def sequential_windows(ids: Ids, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering every target of ``ids`` exactly once."""
    out = []
    for s in range(0, len(ids) - 1, block_size):
        win = as_tensor(ids[s : s + block_size + 1])
        out.append((win[:-1], win[1:]))
    return out


def training_batch(ids: Ids, batch_size: int, block_size: int, gen: torch.Generator,
                   routing: str, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's batch under a data routing, for a model with ``counts[l]`` sub-models at level ``l``.

    * ``shared``: (B, T); every sub-model reads every row (the seed).
    * ``split``: (levels, B, T), the same rows for every level; sub-model ``j`` of level ``l``
      reads only row block ``j`` of ``split**l`` blocks.
    * ``shard``: as ``split``, but the rows of sub-model ``j`` of level ``l`` come from its
      own contiguous shard ``j`` of the corpus (the seed's "fractal MoE" data idea).
    """
    if routing == "shared" or len(counts) == 1:
        return get_batch(ids, batch_size, block_size, gen)
    if routing == "split":
        x, y = get_batch(ids, batch_size, block_size, gen)
        return x.expand(len(counts), *x.shape), y.expand(len(counts), *y.shape)
    xs, ys = [], []
    for n in counts:
        shard = len(ids) // n
        parts = [get_batch(ids[j * shard:(j + 1) * shard], batch_size // n, block_size, gen)
                 for j in range(n)]
        xs.append(torch.cat([p[0] for p in parts]))
        ys.append(torch.cat([p[1] for p in parts]))
    return torch.stack(xs), torch.stack(ys)
