"""When speculation pays: the statistics of a run and the adaptive choice of ``gamma``.

The algorithm (propose, verify, accept, roll back) is in ``speculative.py``; this file
holds only policy. A round of ``gamma`` drafted positions at per-position acceptance
``alpha`` yields ``(1 - alpha**(gamma + 1)) / (1 - alpha)`` tokens for ``gamma`` draft
steps and one verification; :class:`Policy` measures those costs and a plain decoding
step as it goes and drafts only while the expected tokens per second beat plain
decoding, probing again at growing intervals when they do not, and never again once
the costs alone rule drafting out. The costs are kept per model and set-up
(:func:`known_costs`), so a process measures them in its first generation only.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpecStats:
    """What a speculative run did; ``alpha`` is the per-position acceptance rate."""

    target_calls: int = 0
    draft_calls: int = 0  # draft steps (all drafts once)
    examined: int = 0  # draft positions verified
    accepted: int = 0  # of those, accepted
    tokens: int = 0  # tokens emitted
    plain_tokens: int = 0  # tokens emitted by plain decoding (fallback or past the context)
    rounds: int = 0  # draft-and-verify rounds
    draft_time: float = 0.0
    verify_time: float = 0.0  # target forward, acceptance and rollback of every round
    plain_time: float = 0.0
    gammas: list[int] = field(default_factory=list)

    @property
    def alpha(self) -> float:
        return self.accepted / self.examined if self.examined else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.tokens / self.target_calls if self.target_calls else 0.0

    @property
    def cost_ratio(self) -> float:
        """c: time of one draft step over one verification round."""
        if not self.draft_calls or not self.rounds:
            return 0.0
        return (self.draft_time / self.draft_calls) / (self.verify_time / self.rounds)

    def to_json(self) -> dict:
        return {"alpha": round(self.alpha, 4),
                "tokens_per_target_call": round(self.tokens_per_target_call, 3),
                "cost_ratio_c": round(self.cost_ratio, 3), "target_calls": self.target_calls,
                "rounds": self.rounds, "draft_calls": self.draft_calls, "tokens": self.tokens,
                "plain_tokens": self.plain_tokens,
                "mean_gamma": round(sum(self.gammas) / len(self.gammas), 2) if self.gammas else 0.0}


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens a round of ``gamma`` drafted positions yields at per-position acceptance ``alpha``."""
    alpha = min(alpha, 0.999)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


# Acceptance above what nested drafts reach (0.6-0.9 measured): if drafting would not pay
# even at this rate, the costs alone rule it out and the policy stops probing.
OPTIMISTIC_ALPHA = 0.9


def best_gamma(alpha: float, draft_step: float, verify: float, plain_step: float, max_gamma: int) -> int:
    """gamma maximising tokens per second; 0 when plain decoding is at least as fast."""
    best, best_rate = 0, 1.0 / plain_step
    for g in range(1, max_gamma + 1):
        rate = expected_tokens(alpha, g) / (g * draft_step + verify)
        if rate > best_rate:
            best, best_rate = g, rate
    return best


class Policy:
    """Adaptive gamma: learn the costs and the acceptance, then draft only while it pays.

    Drafting stops for good as soon as the measured costs say it cannot pay even at an
    acceptance of ``OPTIMISTIC_ALPHA`` (after two short rounds, or at once when an earlier
    generation measured them: at d_model 128 a draft step costs half a verification, and no
    acceptance a nested draft reaches helps). Otherwise,
    while the running acceptance does not pay, it decodes plainly for a back-off of 32, 64,
    ... 256 tokens, then probes until it has 8 fresh drafted positions to judge by (stale
    acceptance kept a d_model 512 run in fallback for 38% of its tokens).
    """

    def __init__(self, max_gamma: int, adaptive: bool, stats: SpecStats,
                 costs: dict[str, float] | None = None, frozen: bool = False) -> None:
        self.max_gamma, self.adaptive, self.stats = max_gamma, adaptive, stats
        self.frozen = frozen  # judge by ``costs`` as given, never by timings (seeded sampling)
        self.recent: deque[bool] = deque(maxlen=32)  # acceptance of the latest drafted positions
        # moving averages: "draft" step, "verify" round, "plain" step. ``costs``: the averages an
        # earlier generation of the same set-up left (:func:`known_costs`), updated in place
        self.cost: dict[str, float] = costs if costs is not None else {}
        self.seen: set[str] = set()  # kinds timed once already (a first call only warms up)
        self.plain_left = 0  # tokens to decode plainly before probing again
        self.backoff = 32

    def timed(self, kind: str, seconds: float, count: int = 1) -> None:
        """Record ``seconds`` spent on ``count`` "draft" steps, "verify" rounds or "plain" steps."""
        setattr(self.stats, f"{kind}_time", getattr(self.stats, f"{kind}_time") + seconds)
        seconds /= count
        if self.frozen:
            return
        if kind not in self.seen:  # the first call of each kind warms up: not representative
            self.seen.add(kind)
        elif kind not in self.cost:
            self.cost[kind] = seconds
        else:
            self.cost[kind] += 0.2 * (seconds - self.cost[kind])

    def costs(self) -> tuple[float, float, float] | None:
        """(draft step, verify round, plain step) once all three are measured."""
        c = self.cost
        return (c["draft"], c["verify"], c["plain"]) if {"plain", "draft", "verify"} <= c.keys() else None

    def ruled_out(self) -> bool:
        """Whether the measured costs alone rule drafting out: plain decoding for good."""
        costs = self.costs()
        if not self.adaptive or costs is None:
            return False
        return not best_gamma(OPTIMISTIC_ALPHA, *costs, self.max_gamma)

    def accepted(self, examined: int, accepted: int) -> None:
        self.recent.extend([True] * accepted + [False] * (examined - accepted))

    def gamma(self) -> int:
        if not self.adaptive:
            return self.max_gamma
        if self.plain_left > 0:
            self.plain_left -= 1
            return 0
        if "plain" not in self.cost:  # measure plain decoding first
            return 0
        costs = self.costs()
        if costs is None:  # two short rounds measure the draft and verification costs
            return min(2, self.max_gamma)
        if self.ruled_out():
            self.plain_left = 10**9
            return 0
        if len(self.recent) < 8:
            return self.max_gamma
        g = best_gamma(sum(self.recent) / len(self.recent), *costs, self.max_gamma)
        if g:
            self.backoff = 32
            return g
        self.plain_left = self.backoff
        self.backoff = min(2 * self.backoff, 256)
        self.recent.clear()  # the next probe decides on fresh acceptance, not on what made us stop
        return 0


# costs measured per model and set-up, kept while the model lives: they are a property of
# the shapes and the machine, not of a prompt, so only a process's first generation of a
# set-up spends rounds measuring them
_KNOWN: weakref.WeakKeyDictionary[Any, dict[tuple, dict[str, float]]] = weakref.WeakKeyDictionary()


def known_costs(model: Any, setup: tuple) -> dict[str, float]:
    """The costs an earlier generation of ``model`` measured for ``setup`` (a dict the
    caller updates in place; empty at first)."""
    return _KNOWN.setdefault(model, {}).setdefault(setup, {})


def forget_costs(model: Any) -> None:
    """Drop what earlier generations of ``model`` measured (the next one measures afresh)."""
    _KNOWN.pop(model, None)
