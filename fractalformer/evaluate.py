"""Validation loss of every sub-model, in nats/token and bits per character.

Bits per character (per byte for the ``byte`` tokenizer) is the currency across
tokenizers: ``bpc = loss_per_token / ln 2 * tokens_per_char`` on the same text.

A level with several sub-models is also scored as an "all experts at once" ensemble:
the mean of its sub-models' log-probabilities, renormalised (a product of experts).

The closing score of ``train`` and the default of ``eval`` read the same windows
(:func:`closing_windows`), so the two commands print the same figures for a run.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import TrainConfig
from .data.corpus import Corpus, batch_generator, encode_cached, get_batch, sequential_windows, text_sha256
from .data.tokenizers import Tokenizer
from .errors import FractalError
from .nn.decode import frozen_weights

Key = tuple[int, int | str]  # (level, index) or (level, "ensemble")


@dataclass
class EvalRow:
    level: int
    index: int | str  # sub-model index, or "ensemble"
    width: int
    params: int
    val_loss: float  # nats per token
    val_bpc: float  # bits per character (byte for the byte tokenizer)
    tokens: int
    unit: str = "char"
    extra: dict | None = None  # family moe: expert usage figures of the validation pass
    split_tokens: int = 0  # targets in the whole validation split (``tokens`` may be fewer)

    @property
    def nats_per_char(self) -> float:
        return self.val_bpc * math.log(2)

    @property
    def coverage(self) -> str:
        """What the figures were computed over, said next to them: a part or the whole split."""
        if self.tokens < self.split_tokens:
            return f"over the first {self.tokens:,} of {self.split_tokens:,} validation tokens"
        return f"over all {self.tokens:,} validation tokens"

    def to_json(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra") or {}
        return {**d, "val_nats_per_char": self.nats_per_char, **extra}


def to_bpc(loss: float, units_per_token: float) -> float:
    return loss / math.log(2) / units_per_token


def closing_windows(train: TrainConfig) -> int:
    """Validation windows a run is scored on when it ends (and by ``eval`` unless told).

    ``final_eval`` N > 0: the first N. Otherwise as many as the run trained on
    (``max_steps * batch_size``, the whole split when that is more): a forward pass costs
    about a third of a training step, so a short run's score stays cheaper than its training
    while a real run's covers the whole split.
    """
    return train.final_eval if train.final_eval > 0 else train.max_steps * train.batch_size


def text_corpus(text: str, tok: Tokenizer, on_unknown: str = "error") -> Corpus:
    """All of ``text`` as the validation split (and no training split): what ``eval --data``
    scores, since a file named for scoring is not the tail of a training text."""
    ids = torch.from_numpy(encode_cached(text, tok, on_unknown).astype(np.int64))
    if len(ids) < 2:
        raise FractalError(f"the text has {len(ids)} token(s); scoring needs at least 2")
    units = tok.units(tok.decode(ids.tolist()))
    return Corpus(ids[:0], ids, units / len(ids), tok.unit, text_sha256(text))


def fixed_val_batches(corpus: Corpus, n: int, batch_size: int, block_size: int,
                      seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``n`` random validation batches at every evaluation of a run."""
    gen = batch_generator(seed + 7919, 0)
    return [get_batch(corpus.val, batch_size, block_size, gen) for _ in range(n)]


@torch.no_grad()
def loss_sums(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              ensembles: bool = True) -> dict[Key, float]:
    """Summed cross-entropy of every sub-model (and level ensemble) on one batch."""
    out: dict[Key, float] = {}
    for lv, lg in model(x).items():
        logp = F.log_softmax(lg.float(), -1)  # (n, B, T, V)
        nll = -logp.gather(-1, y.expand(lg.shape[0], *y.shape).unsqueeze(-1)).squeeze(-1)
        for j, s in enumerate(nll.sum((1, 2)).tolist()):
            out[(lv, j)] = s
        if ensembles and lg.shape[0] > 1:
            ens = F.log_softmax(logp.mean(0), -1)
            out[(lv, "ensemble")] = float(-ens.gather(-1, y.unsqueeze(-1)).sum())
    return out


@torch.no_grad()
def mean_losses(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                device: torch.device | str = "cpu", autocast: contextlib.AbstractContextManager | None = None,
                ensembles: bool = True) -> tuple[dict[Key, float], int]:
    """Token-weighted mean loss (nats/token) of every sub-model over ``batches``."""
    was_training = model.training
    model.eval()
    total: dict[Key, float] = {}
    count = 0
    scope = frozen_weights()  # every batch reuses one gather of each sub-model's weights
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        if x.dim() == 1:
            x, y = x[None], y[None]
        with autocast or contextlib.nullcontext(), scope:
            for k, v in loss_sums(model, x, y, ensembles).items():
                total[k] = total.get(k, 0.0) + v
        count += y.numel()
    model.train(was_training)
    return {k: v / count for k, v in total.items()}, count


def evaluate_full(model: torch.nn.Module, corpus: Corpus, block_size: int,
                  device: torch.device | str = "cpu", batch_size: int = 32, windows_limit: int = -1,
                  progress: bool = False) -> list[EvalRow]:
    """Every validation target exactly once, in non-overlapping windows of ``block_size``.

    One row per sub-model (the full model first), then one per level ensemble.
    ``windows_limit`` > 0 scores only the first that many windows (a quicker estimate);
    ``progress`` shows a bar over the batches.
    """
    windows = sequential_windows(corpus.val, block_size)
    if windows_limit > 0:
        windows = windows[:windows_limit]
    full = [w for w in windows if len(w[0]) == block_size]
    batches = [(torch.stack([w[0] for w in full[i : i + batch_size]]),
                torch.stack([w[1] for w in full[i : i + batch_size]]))
               for i in range(0, len(full), batch_size)]
    batches += [w for w in windows if len(w[0]) != block_size]
    batches = tqdm(batches, desc="validation", unit="batch", leave=False, disable=not progress)
    track = getattr(model, "track_usage", None)
    with track() if track else contextlib.nullcontext() as usage:
        losses, n = mean_losses(model, batches, device)
    rows = []
    for (lv, j), loss in sorted(losses.items(), key=lambda kv: (kv[0][0], isinstance(kv[0][1], str))):
        cfg = model.sub_model_config(lv)
        params = model.num_params(lv) * (model.nest.count(lv) if j == "ensemble" else 1)
        rows.append(EvalRow(lv, j, cfg.d_model, params, loss, to_bpc(loss, corpus.val_units_per_token),
                            n, corpus.unit, split_tokens=len(corpus.val) - 1))
    if usage is not None:
        rows[0].extra = usage.summary()
    return rows
