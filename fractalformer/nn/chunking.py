"""Where a chunk of units starts: the boundary rules of the concept family's variable chunking.

A rule marks ``starts[b, t]`` when unit ``t`` of row ``b`` opens a new chunk (unit 0 always
does). Every rule decides at ``t`` from units ``<= t`` only - that is what keeps a model that
reads chunk summaries causal - and each has a one-unit form for decoding, fed the state it
kept of unit ``t - 1``:

* :func:`space_starts` - SpaceByte's rule: a chunk opens at the first byte that is not
  space-like after a space-like one (a word and the spaces after it are one chunk);
* :func:`entropy_starts` - BLT's rule: a chunk opens where the next-byte entropy that a
  small causal byte model predicted for this byte exceeds a threshold;
* :class:`Router` - H-Net's dynamic chunking: a learned score of how much adjacent states
  differ, ``p_t = (1 - cos(q_t, k_{t-1})) / 2``, a chunk opening where ``p_t >= 1/2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


def _space_table(device: torch.device) -> torch.Tensor:
    """(256,) bool: bytes SpaceByte calls space-like - not an ASCII letter or digit, and not
    part of a multi-byte UTF-8 character (bytes >= 0x80 belong to the word they are in)."""
    b = torch.arange(256, device=device)
    letter = ((b >= 48) & (b <= 57)) | ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122))
    return ~letter & (b < 128)


def space_starts(ids: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """``starts`` (B, T) of byte ids (B, T); ``prev`` (B,): the byte before ``ids[:, 0]`` if any."""
    space = _space_table(ids.device)[ids]
    before = torch.cat([space[:, :1] if prev is None else _space_table(ids.device)[prev][:, None],
                        space[:, :-1]], 1)
    starts = before & ~space
    if prev is None:
        starts[:, 0] = True
    return starts


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of next-unit logits (..., V)."""
    logp = F.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def entropy_starts(ent: torch.Tensor, threshold: torch.Tensor, prev: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``starts`` (B, T) from ``ent`` (B, T), the entropy predicted *at* each unit for the next;
    unit ``t`` opens a chunk when the entropy predicted for it (at ``t - 1``) exceeds
    ``threshold``. ``prev`` (B,): the entropy at the unit before ``ent[:, 0]`` if any."""
    predicted = torch.cat([ent[:, :1] if prev is None else prev[:, None], ent[:, :-1]], 1)
    starts = predicted > threshold
    if prev is None:
        starts[:, 0] = True
    return starts


class Router(nn.Module):
    """H-Net's routing module: boundary probabilities from the cosine of adjacent states.

    ``q`` and ``k`` start as the identity (H-Net's initialisation): a chunk then opens where
    the encoder's states turn, and training moves the rule from there.
    """

    def __init__(self, nest: object, dim: int) -> None:
        super().__init__()
        self.q = Linear(nest, dim, dim, False)
        self.k = Linear(nest, dim, dim, False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for lin in (self.q, self.k):
                lin.weight.copy_(torch.eye(lin.weight.shape[-1]).expand_as(lin.weight))

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys (B, T, d) of states x (1, B, T, d): what the next unit compares itself with."""
        return F.normalize(self.k(x, 0)[0], dim=-1)

    def forward(self, x: torch.Tensor, prev_key: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities (B, T) that each unit of states ``x`` (1, B, T, d) opens a chunk;
        ``prev_key`` (B, d): the key of the unit before ``x[:, :, 0]`` (none: that unit is
        the first and opens a chunk with probability 1)."""
        return self.scores(x, prev_key)[0]

    def scores(self, x: torch.Tensor, prev_key: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s probabilities and the keys of ``x`` (what the next unit compares with)."""
        q, k = F.normalize(self.q(x, 0)[0], dim=-1), self.keys(x)
        if prev_key is None:
            p = (1 - (q[:, 1:] * k[:, :-1]).sum(-1)) * 0.5
            p = torch.cat([p.new_ones(p.shape[0], 1), p], 1)
        else:
            p = (1 - (q * torch.cat([prev_key[:, None], k[:, :-1]], 1)).sum(-1)) * 0.5
        return p.clamp(0.0, 1.0), k
