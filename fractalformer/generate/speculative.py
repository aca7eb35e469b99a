"""Speculative decoding with a model's own nested sub-models as drafts.

Each round, every draft proposes ``gamma`` tokens (drafts of one level run as one
batched pass, each sub-model reading its own row), the target scores every candidate in
one batched forward, and the longest accepted continuation is kept.

Acceptance keeps the output distributed exactly as the target's:

* greedy: a drafted token is accepted while it equals the target's argmax;
* sampling: at each position the live candidates (those agreeing with everything
  accepted so far) are tried in turn - accept token ``x`` of a candidate with draft
  distribution ``q`` with probability ``min(1, p(x) / q(x))``; on rejection the target
  distribution becomes the residual ``norm(max(0, p - q))`` for the next candidate
  (recursive rejection sampling); if every candidate is rejected the token is sampled
  from the last residual. With one draft this is Leviathan et al. / Chen et al. (2023).

KV caches of target and drafts are rolled back after every round. ``adaptive`` picks
``gamma`` from the running acceptance rate and the measured draft/target cost, and falls
back to plain decoding (probing again now and then) when drafting does not pay.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import FractalError
from ..nn import KVCache
from .sampling import fresh_seed, generate, pick, probabilities


@dataclass
class SpecStats:
    """What a speculative run did; ``alpha`` is the per-position acceptance rate."""

    target_calls: int = 0
    draft_calls: int = 0
    examined: int = 0  # draft positions verified
    accepted: int = 0  # of those, accepted
    tokens: int = 0  # tokens emitted
    plain_tokens: int = 0  # tokens emitted by plain decoding (fallback or past the context)
    verify_calls: int = 0  # target calls that verified drafts
    verify_time: float = 0.0
    draft_time: float = 0.0
    gammas: list[int] = field(default_factory=list)

    @property
    def alpha(self) -> float:
        return self.accepted / self.examined if self.examined else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.tokens / self.target_calls if self.target_calls else 0.0

    @property
    def cost_ratio(self) -> float:
        """c: time of one draft step over one target call."""
        if not self.draft_calls or not self.verify_calls:
            return 0.0
        return (self.draft_time / self.draft_calls) / (self.verify_time / self.verify_calls)

    def to_json(self) -> dict:
        return {"alpha": round(self.alpha, 4),
                "tokens_per_target_call": round(self.tokens_per_target_call, 3),
                "cost_ratio_c": round(self.cost_ratio, 3), "target_calls": self.target_calls,
                "draft_calls": self.draft_calls, "tokens": self.tokens, "plain_tokens": self.plain_tokens,
                "mean_gamma": round(sum(self.gammas) / len(self.gammas), 2) if self.gammas else 0.0}


def parse_sub_model(spec: str, model: torch.nn.Module) -> tuple[int, int]:
    """'L:J' -> (L, J), checked against the model."""
    try:
        level, index = (int(p) for p in spec.split(":"))
    except ValueError:
        raise FractalError(f"a sub-model is written LEVEL:INDEX (e.g. 2:0), got {spec!r}") from None
    model.nest.check(level, index)
    return level, index


def best_gamma(alpha: float, c: float, max_gamma: int) -> int:
    """gamma maximising expected tokens per unit time; 0 when plain decoding is faster."""
    alpha = min(alpha, 0.999)
    best, best_speed = 0, 1.0
    for g in range(1, max_gamma + 1):
        speed = (1 - alpha ** (g + 1)) / (1 - alpha) / (c * g + 1)
        if speed > best_speed:
            best, best_speed = g, speed
    return best


class _Draft:
    """The drafts of one level: one batched forward per step, one row per sub-model."""

    def __init__(self, model: torch.nn.Module, level: int, indices: list[int]) -> None:
        self.model, self.level, self.indices = model, level, indices
        self.n = model.nest.count(level)
        self.cache = model.new_cache(1, [level])[level]
        self.device = model.embed.weight.device

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (n, t): row j is fed to sub-model j. Returns last-position logits (n, V)."""
        idx = torch.zeros(self.level + 1, *tokens.shape, dtype=torch.long, device=self.device)
        idx[self.level] = tokens
        return self.model.run(idx, [self.level], {self.level: self.cache})[self.level][:, 0, -1]


@torch.no_grad()
def speculate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int,
              drafts: list[tuple[int, int]], gamma: int = 4, target: tuple[int, int] = (0, 0),
              temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
              seed: int | None = None, adaptive: bool = True, stats: SpecStats | None = None
              ) -> Iterator[int]:
    """Yield ``max_new_tokens`` tokens distributed exactly as ``target``'s own sampling."""
    stats = stats if stats is not None else SpecStats()
    _check(model, drafts, target, gamma, prompt)
    model.eval()
    device = model.embed.weight.device
    ctx = model.config.block_size
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else fresh_seed())
    tl, tj = target
    levels = sorted({lv for lv, _ in drafts})
    groups = [_Draft(model, lv, [j for dl, j in drafts if dl == lv]) for lv in levels]
    k = len(drafts)
    tcache = model.new_cache(k, [tl])[tl]
    seq = list(prompt[-ctx:])
    emitted = 0

    def target_forward(tokens: torch.Tensor, verify: bool = True) -> torch.Tensor:  # (k, t) -> (k, t, V)
        t0 = time.perf_counter()
        out = model.run(tokens, [tl], {tl: tcache})[tl][tj]
        if verify:  # c compares a draft step with a verification call
            stats.verify_time += time.perf_counter() - t0
            stats.verify_calls += 1
        stats.target_calls += 1
        return out

    # prefill everything but the last prompt token, which is "pending" (not counted as a call)
    if len(seq) > 1:
        model.run(torch.tensor([seq[:-1]] * k, device=device), [tl], {tl: tcache})
        for g in groups:
            g.step(torch.tensor([seq[:-1]] * g.n, device=device))
    drafted_len = len(seq) - 1  # positions held by the draft caches
    g_now = gamma
    plain_until = -1  # in fallback: plain decoding until this many tokens are emitted

    while emitted < max_new_tokens:
        room = min(ctx - len(seq), max_new_tokens - emitted - 1)
        if plain_until >= 0 and emitted >= plain_until:  # fallback over: probe with one round
            plain_until, g_now = -1, gamma
        elif adaptive and plain_until < 0 and stats.examined >= 8 and stats.verify_calls:
            g_now = best_gamma(stats.alpha, stats.cost_ratio, gamma)
            if g_now == 0:
                plain_until = emitted + 32  # plain decoding for a while, then probe again
        if room < 1 or plain_until >= 0:
            if len(seq) >= ctx:  # past the context: plain sliding-window decoding, as `generate`
                for tok in generate(model, seq, max_new_tokens - emitted, temperature, top_k, top_p,
                                    int(torch.randint(0, 2**31, (1,), generator=gen)), level=tl, index=tj):
                    stats.tokens += 1
                    stats.plain_tokens += 1
                    yield tok
                return
            logits = target_forward(torch.tensor([[seq[-1]]] * k, device=device), verify=False)[:, -1]
            tok = int(pick(logits[:1].float() if temperature <= 0 else
                            probabilities(logits[:1], temperature, top_k, top_p), temperature, gen))
            seq.append(tok)
            emitted += 1
            stats.tokens += 1
            stats.plain_tokens += 1
            yield tok
            continue
        g_round = min(g_now, room)
        stats.gammas.append(g_round)

        # 1. drafts propose g_round tokens each (one batched pass per level per step)
        cand, qs = [], []
        t0 = time.perf_counter()
        for g in groups:
            logits = g.step(torch.tensor([seq[drafted_len:]] * g.n, device=device))
            toks, probs = [], []
            for i in range(g_round):
                q = probabilities(logits, temperature, top_k, top_p)
                x = pick(q, temperature, gen)
                toks.append(x)
                probs.append(q)
                if i + 1 < g_round:
                    logits = g.step(x[:, None])
            toks_t, probs_t = torch.stack(toks, 1), torch.stack(probs, 1)  # (n, g), (n, g, V)
            cand += [toks_t[j] for j in g.indices]
            qs += [probs_t[j] for j in g.indices]
            g.cache.length = len(seq)  # keep only the shared prefix (through the pending token)
        drafted_len = len(seq)
        stats.draft_time += time.perf_counter() - t0
        stats.draft_calls += g_round  # draft steps (every draft level once per step)

        # 2. the target scores every candidate in one batched forward
        start = tcache.length
        cand_t = torch.stack(cand)  # (k, g)
        tokens = torch.cat([torch.full((k, 1), seq[-1], device=device, dtype=torch.long), cand_t], 1)
        scores = target_forward(tokens)  # (k, g + 1, V)
        # greedy compares raw logits (exactly what plain greedy decoding does)
        p_all = scores.float() if temperature <= 0 else probabilities(scores, temperature, top_k, top_p)

        # 3. verify position by position; the longest accepted continuation wins
        live = list(range(k))
        new: list[int] = []
        for i in range(g_round):
            stats.examined += 1
            p = p_all[live[0], i]
            chosen = None
            for c in live:
                x = int(cand_t[c, i])
                if temperature <= 0:
                    ok = x == int(p.argmax())
                else:
                    q = qs[c][i]
                    ok = bool(torch.rand((), generator=gen, device=device) * q[x] < p[x])
                    if not ok:
                        resid = (p - q).clamp_min(0)
                        p = resid / resid.sum() if resid.sum() > 0 else p
                if ok:
                    chosen = x
                    break
            if chosen is None:
                new.append(int(pick(p[None], temperature, gen)))
                break
            stats.accepted += 1
            new.append(chosen)
            live = [c for c in live if int(cand_t[c, i]) == chosen]
        else:  # every drafted token accepted: the target's bonus token
            new.append(int(pick(p_all[live[0], g_round][None], temperature, gen)))

        # 4. roll the target cache back to the accepted prefix (pending + accepted), on every row
        commit_row(tcache, live[0], start, start + len(new), model.nest.count(tl))
        for tok in new[: max_new_tokens - emitted]:
            seq.append(tok)
            emitted += 1
            stats.tokens += 1
            yield tok


def commit_row(cache: KVCache, src: int, start: int, keep: int, groups: int = 1) -> None:
    """Keep positions ``< keep``; positions ``start .. keep`` of every row become row ``src``'s.

    The cache's rows are ``groups`` blocks (one per sub-model of the level) of one row per
    candidate; the copy happens inside every block.
    """
    for kv in (cache.k, cache.v):
        blocks = kv.view(kv.shape[0], groups, kv.shape[1] // groups, *kv.shape[2:])
        blocks[:, :, :, :, start:keep] = blocks[:, :, src:src + 1, :, start:keep]
    cache.length = keep


def _check(model: torch.nn.Module, drafts: list[tuple[int, int]], target: tuple[int, int], gamma: int,
           prompt: list[int]) -> None:
    if not prompt:
        raise FractalError("the prompt is empty")
    if not drafts:
        raise FractalError("speculative decoding needs at least one --draft")
    if gamma < 1:
        raise FractalError(f"--gamma must be at least 1, got {gamma}")
    for lv, j in [*drafts, target]:
        model.nest.check(lv, j)
        if model.needed_levels(lv) != [lv]:
            raise FractalError(f"sub-model ({lv}, {j}) reads other levels (residual="
                               f"{model.config.residual}); speculation needs standalone sub-models")
    for lv, j in drafts:
        if lv <= target[0]:
            raise FractalError(f"draft ({lv}, {j}) is not smaller than the target {target}: a draft must "
                               f"come from a deeper level")
    if len(set(drafts)) != len(drafts):
        raise FractalError("each draft may be given once")
