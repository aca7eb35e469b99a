"""Validation loss in nats/token and bits per character (per byte for ``byte``).

Bits per character is the currency across tokenizers:
``bpc = loss_per_token / ln 2 * tokens_per_char`` on the same validation text.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .data import Corpus, batch_generator, get_batch, sequential_windows


@dataclass
class EvalResult:
    val_loss: float  # nats per token
    val_bpc: float  # bits per character (byte for the byte tokenizer)
    tokens: int
    unit: str = "char"

    @property
    def nats_per_char(self) -> float:
        return self.val_bpc * math.log(2)


def to_bpc(loss: float, units_per_token: float) -> float:
    return loss / math.log(2) / units_per_token


def fixed_val_batches(corpus: Corpus, n: int, batch_size: int, block_size: int,
                      seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``n`` random validation batches at every evaluation of a run."""
    gen = batch_generator(seed + 7919, 0)
    return [get_batch(corpus.val, batch_size, block_size, gen) for _ in range(n)]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
              device: torch.device | str = "cpu", autocast: contextlib.AbstractContextManager | None = None
              ) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over ``batches`` (nats/token) and the token count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        if x.dim() == 1:
            x, y = x[None], y[None]
        with autocast or contextlib.nullcontext():
            _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count, count


def evaluate_full(model: torch.nn.Module, corpus: Corpus, block_size: int,
                  device: torch.device | str = "cpu", batch_size: int = 32) -> EvalResult:
    """Every validation target exactly once, in non-overlapping windows of ``block_size``."""
    windows = sequential_windows(corpus.val, block_size)
    full = [w for w in windows if len(w[0]) == block_size]
    batches = [(torch.stack([w[0] for w in full[i : i + batch_size]]),
                torch.stack([w[1] for w in full[i : i + batch_size]]))
               for i in range(0, len(full), batch_size)]
    batches += [w for w in windows if len(w[0]) != block_size]
    loss, n = mean_loss(model, batches, device)
    return EvalResult(loss, to_bpc(loss, corpus.val_units_per_token), n, corpus.unit)
