"""Speculative decoding with a model's own nested sub-models as drafts.

Each round, every draft proposes ``gamma`` tokens, the target scores every candidate in
one batched forward, and the longest accepted continuation is kept. A lone draft runs
as a dense model holding only its own weights (``extract``); several drafts of one level
run as one batched pass of that level, each sub-model reading its own row.

Acceptance keeps the output distributed exactly as the target's:

* greedy: a drafted token is accepted while it equals the target's argmax;
* sampling: at each position the live candidates (those agreeing with everything
  accepted so far) are tried in turn - accept token ``x`` of a candidate with draft
  distribution ``q`` with probability ``min(1, p(x) / q(x))``; on rejection the target
  distribution becomes the residual ``norm(max(0, p - q))`` for the next candidate
  (recursive rejection sampling); if every candidate is rejected the token is sampled
  from the last residual. With one draft this is Leviathan et al. / Chen et al. (2023),
  decided for every position at once (``_accept_one``).

KV caches of target and drafts are rolled back after every round. How many tokens to
draft (``adaptive``: from the running acceptance rate and the measured costs, decoding
plainly while drafting does not pay) is policy, kept apart in ``spec_policy.py``.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator

import torch

from ..errors import FractalError
from ..nn import KVCache
from ..nn.decode import frozen_weights
from .sampling import decode_fn, extracted, fresh_seed, generate, is_greedy, pick, probabilities
from .spec_policy import Policy, SpecStats, known_costs

# ASCII digits only (str.isdigit and int() also take superscripts and other scripts' digits),
# and few of them, so that no spec reaches int()'s limit on digits
_SUB_MODEL = re.compile(r"(0|[1-9][0-9]{0,5}):(0|[1-9][0-9]{0,5}|ensemble)", re.ASCII)


def parse_sub_model(spec: str, model: torch.nn.Module, ensemble: bool = False) -> tuple[int, int | str]:
    """'L:J' -> (L, J) (and with ``ensemble`` 'L:ensemble' -> (L, "ensemble")), checked
    against the model: the one parser of the command line and the server."""
    m = _SUB_MODEL.fullmatch(spec)
    if m is None or (m[2] == "ensemble" and not ensemble):
        shape = "LEVEL:INDEX or LEVEL:ensemble" if ensemble else "LEVEL:INDEX"
        raise FractalError(f"a sub-model is written {shape} (e.g. 2:0), got {spec[:40]!r}")
    level = int(m[1])
    if m[2] == "ensemble":
        model.nest.check(level)
        return level, "ensemble"
    model.nest.check(level, int(m[2]))
    return level, int(m[2])


class _Drafter:
    """Drafts from one level: a lone sub-model as an extracted dense model, or the whole
    level as one batched pass (row ``j`` is sub-model ``j``, fed its own tokens)."""

    def __init__(self, model: torch.nn.Module, level: int, indices: list[int], compile: bool | str) -> None:
        if len(indices) == 1:  # only its own weights: far cheaper than running the level
            self.runner, self.level, self.rows = extracted(model, level, indices[0]), 0, [0]
        else:
            self.runner, self.level, self.rows = model, level, indices
        self.run = decode_fn(self.runner, compile)
        self.n = self.runner.nest.count(self.level)
        self.cache = self.runner.new_cache(1, [self.level])[self.level]
        self.proposed: list[list[int]] = []  # the latest round's tokens, one list per row
        self.fed = 0  # how many of them are in the cache
        self.device = model.embed.weight.device

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (n, t): row j is fed to sub-model j. Returns last-position logits (n, V)."""
        if self.level == 0:
            idx = tokens
        else:
            idx = torch.zeros(self.level + 1, *tokens.shape, dtype=torch.long, device=self.device)
            idx[self.level] = tokens
        return self.run(idx, [self.level], {self.level: self.cache})[self.level][:, 0, -1]


class _Speculation:
    """State of one speculative generation: sequence, caches, drafters, sampling."""

    def __init__(self, model: torch.nn.Module, prompt: list[int], drafts: list[tuple[int, int]],
                 target: tuple[int, int], temperature: float, top_k: int | None, top_p: float | None,
                 seed: int | None, confidence: float, stats: SpecStats, compile: bool | str = False) -> None:
        self.model, self.stats = model, stats
        self.device = model.embed.weight.device
        self.sampling = (temperature, top_k, top_p)
        self.greedy = is_greedy(temperature)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed if seed is not None else fresh_seed())
        self.tl, self.tj = target
        levels = sorted({lv for lv, _ in drafts})
        self.drafters = [_Drafter(model, lv, [j for dl, j in drafts if dl == lv], compile) for lv in levels]
        self.run = decode_fn(model, compile)
        self.confidence = confidence
        self.k = len(drafts)  # target rows: one per candidate
        self.groups = model.nest.count(self.tl)  # the target level's sub-models ride in the rows too
        self.tcache = model.new_cache(self.k, [self.tl])[self.tl]
        self.views: dict[int, KVCache] = {}  # the first u rows of the target cache (plain decoding: 1)
        self.seq = list(prompt[-model.config.block_size:])
        self.synced = 0  # positions whose keys/values every target row holds
        if len(self.seq) > 1:  # prefill all but the last prompt token (it is "pending") on one row;
            self._forward(torch.tensor([self.seq[:-1]], device=self.device))  # drafts catch up later

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Target logits (u, t, V) for ``tokens`` (u, t) on the first ``u`` candidate rows of
        its cache: a view when one exists (one group, or one row), else all rows, padded."""
        u = tokens.shape[0]
        if u < self.k and (self.groups == 1 or u == 1):
            if u not in self.views:
                self.views[u] = self.tcache.rows(self.groups, u)
            view = self.views[u]
            view.length = self.tcache.length
            out = self.run(tokens, [self.tl], {self.tl: view})[self.tl][self.tj]
            self.tcache.length = view.length
            return out
        if u < self.k:  # pad with copies of the first candidate
            tokens = torch.cat([tokens, tokens[:1].expand(self.k - u, -1)])
        return self.run(tokens, [self.tl], {self.tl: self.tcache})[self.tl][self.tj][:u]

    def plain_step(self) -> int:
        logits = self._forward(torch.tensor([[self.seq[-1]]], device=self.device))[0, -1]
        self.stats.target_calls += 1
        t, k, p = self.sampling
        tok = int(pick(logits[None].float() if self.greedy else probabilities(logits[None], t, k, p), t,
                       self.gen))
        self.seq.append(tok)
        self.stats.plain_tokens += 1
        return tok

    def propose(self, g: int) -> tuple[list[list[int]], list[torch.Tensor], int]:
        """Every draft's tokens (as lists), when sampling its distributions (g', V), and g'.

        With ``confidence`` > 0 a draft stops early after a token that every one of its rows
        gave less than ``confidence`` probability (the row most sure of its own latest token
        decides: :func:`draft_is_unsure`); all candidates are cut to the shortest draft.
        """
        t, k, p = self.sampling
        cand: list[list[int]] = []
        qs: list[torch.Tensor] = []
        steps = 0
        for d in self.drafters:
            logits = d.step(torch.tensor([self.seq[d.cache.length:]] * d.n, device=self.device))
            toks, probs = [], []
            for i in range(g):
                q = (logits if not self.confidence else logits.float().softmax(-1)) if self.greedy else \
                    probabilities(logits, t, k, p)
                x = pick(q, t, self.gen)
                toks.append(x)
                probs.append(q)
                if i + 1 == g or (self.confidence and draft_is_unsure(q, x, self.confidence)):
                    break
                logits = d.step(x[:, None])
            d.proposed, d.fed = torch.stack(toks, 1).tolist(), len(toks) - 1  # (n, g'), tokens in cache
            steps = max(steps, len(toks))
            cand += [d.proposed[r] for r in d.rows]
            if not self.greedy:
                q_all = torch.stack(probs, 1)
                qs += [q_all[r] for r in d.rows]
        g = min(len(c) for c in cand)
        self.stats.draft_calls += steps
        return [c[:g] for c in cand], [q[:g] for q in qs], steps

    def rollback_drafts(self, new: list[int]) -> None:
        """Keep in each draft's cache the longest prefix of its own tokens that was accepted."""
        for d in self.drafters:
            keep = min(d.fed, len(new) - 1)  # the last new token is pending: fed next round
            for row in d.proposed:
                same = 0
                while same < keep and row[same] == new[same]:
                    same += 1
                keep = same
            d.cache.length = len(self.seq) + keep

    def verify(self, cand: list[list[int]], qs: list[torch.Tensor]) -> list[int]:
        """Score every candidate in one batched target forward; return the accepted tokens."""
        s, g = self.stats, len(cand[0])
        if self.synced < self.tcache.length:  # plain steps filled row 0 only
            commit_row(self.tcache, 0, self.synced, self.tcache.length, self.groups)
        start = self.tcache.length
        if self.greedy:  # identical proposals need one verification row
            cand = [list(c) for c in dict.fromkeys(map(tuple, cand))]
        scores = self._forward(torch.tensor([[self.seq[-1], *c] for c in cand], device=self.device))
        s.target_calls += 1
        live = list(range(len(cand)))
        new: list[int] = []
        if self.greedy:  # compare with the argmax of the raw logits, as plain greedy decoding does
            best = scores.argmax(-1).tolist()  # (k, g + 1)
            for i in range(g):
                want = best[live[0]][i]
                new.append(want)
                live_next = [c for c in live if cand[c][i] == want]
                if not live_next:
                    break
                live = live_next
            else:
                new.append(best[live[0]][g])
        else:
            new = self._accept_sampled(scores, cand, qs, live)
        accepted = len(new) - 1
        s.examined += min(len(new), g)
        s.accepted += accepted
        self.commit(live[0], start, start + len(new))
        self.rollback_drafts(new)
        s.rounds += 1
        return new

    def _accept_sampled(self, scores: torch.Tensor, cand: list[list[int]], qs: list[torch.Tensor],
                        live: list[int]) -> list[int]:
        """Recursive rejection sampling; ``live`` is narrowed in place to the winners."""
        t, k, p_ = self.sampling
        p_all = probabilities(scores, t, k, p_)
        if len(live) == 1:
            return self._accept_one(p_all[live[0]], cand[live[0]], qs[live[0]])
        g, new = len(cand[0]), []
        for i in range(g):
            p = p_all[live[0], i]
            chosen = None
            for c in live:
                x, q = cand[c][i], qs[c][i]
                if bool(torch.rand((), generator=self.gen, device=self.device) * q[x] < p[x]):
                    chosen = x
                    break
                resid = (p - q).clamp_min(0)
                p = resid / resid.sum() if resid.sum() > 0 else p
            if chosen is None:
                new.append(int(pick(p[None], t, self.gen)))
                return new
            new.append(chosen)
            live[:] = [c for c in live if cand[c][i] == chosen]
        new.append(int(pick(p_all[live[0], g][None], t, self.gen)))
        return new

    def _accept_one(self, p: torch.Tensor, cand: list[int], q: torch.Tensor) -> list[int]:
        """One draft, vectorised: accept token i with probability min(1, p_i(x_i) / q_i(x_i)),
        all positions at once; the first rejection samples from ``norm(max(0, p - q))``
        there, and with none rejected the bonus token comes from ``p`` after the last."""
        g = len(cand)
        x = torch.tensor(cand, device=p.device)[:, None]
        u = torch.rand(g, generator=self.gen, device=p.device)
        ok = (u * q.gather(-1, x)[:, 0] < p[:g].gather(-1, x)[:, 0]).tolist()
        n = ok.index(False) if False in ok else g
        t = self.sampling[0]
        if n == g:
            return [*cand, int(pick(p[g][None], t, self.gen))]
        resid = (p[n] - q[n]).clamp_min(0)
        rest = resid / resid.sum() if resid.sum() > 0 else p[n]
        return [*cand[:n], int(pick(rest[None], t, self.gen))]

    def commit(self, src: int, start: int, keep: int) -> None:
        if self.k > 1:
            commit_row(self.tcache, src, start, keep, self.groups)
        self.tcache.length = self.synced = keep


@torch.no_grad()
def speculate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int,
              drafts: list[tuple[int, int]], gamma: int = 4, target: tuple[int, int] = (0, 0),
              temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
              seed: int | None = None, adaptive: bool = True, confidence: float = 0.0,
              compile: bool | str = False, stats: SpecStats | None = None) -> Iterator[int]:
    """Yield ``max_new_tokens`` tokens distributed exactly as ``target``'s own sampling.

    ``confidence`` > 0 ends a draft's proposal early at a token it gives less probability
    (the output distribution is unchanged: only how much is proposed depends on it).
    ``compile`` runs drafts and target through ``torch.compile`` (:func:`~.sampling.decode_fn`).
    """
    stats = stats if stats is not None else SpecStats()
    check_speculation(model, drafts, target, gamma, prompt, confidence)
    model.eval()
    ctx = model.config.block_size
    if adaptive and seed is not None and not is_greedy(temperature):
        # timings vary from run to run, and with them the policy's choices and so which random
        # draws make which token: a seeded sample judges by parameter counts instead
        policy = Policy(gamma, adaptive, stats, shape_costs(model, drafts, target), frozen=True)
    else:
        policy = Policy(gamma, adaptive, stats,
                        known_costs(model, (tuple(drafts), target, compile, torch.get_num_threads())))
    sampling = (temperature, top_k, top_p)
    if policy.ruled_out():  # an earlier generation measured that drafting cannot pay here
        yield from _plain(model, prompt, max_new_tokens, sampling, seed, target, compile, stats)
        return
    scope = frozen_weights()  # weight slices gathered once, entered around each round
    with scope:
        state = _Speculation(model, prompt, drafts, target, temperature, top_k, top_p, seed, confidence,
                             stats, compile)
    emitted = 0
    while emitted < max_new_tokens:
        room = min(ctx - len(state.seq), max_new_tokens - emitted - 1)
        g = min(policy.gamma(), room)
        # past the context (plain sliding-window decoding), or drafting ruled out for good:
        # plain decoding, without the rounds' bookkeeping
        if g < 1 and (len(state.seq) >= ctx or policy.ruled_out()):
            seed2 = int(torch.randint(0, 2**31, (1,), generator=state.gen))
            left = max_new_tokens - emitted
            yield from _plain(model, state.seq, left, sampling, seed2, target, compile, stats)
            return
        with scope:
            new = _round(state, policy, g, stats)
        for tok in new[: max_new_tokens - emitted]:
            emitted += 1
            stats.tokens += 1
            yield tok


def _plain(model: torch.nn.Module, seq: list[int], n: int, sampling: tuple, seed: int | None,
           target: tuple[int, int], compile: bool | str, stats: SpecStats) -> Iterator[int]:
    """``n`` tokens after ``seq`` by plain decoding of the target (counted as plain tokens)."""
    for tok in generate(model, seq, n, *sampling, seed, level=target[0], index=target[1], compile=compile):
        stats.tokens += 1
        stats.plain_tokens += 1
        stats.target_calls += 1
        yield tok


def _round(state: _Speculation, policy: Policy, g: int, stats: SpecStats) -> list[int]:
    """One plain step (``g`` = 0) or one propose-verify-accept round; the new tokens."""
    if g < 1:
        t0 = time.perf_counter()
        new = [state.plain_step()]
        policy.timed("plain", time.perf_counter() - t0)
        return new
    t0 = time.perf_counter()
    cand, qs, steps = state.propose(g)
    stats.gammas.append(len(cand[0]))  # drafts may stop early
    t1 = time.perf_counter()
    new = state.verify(cand, qs)
    policy.timed("draft", t1 - t0, steps)
    policy.timed("verify", time.perf_counter() - t1)
    policy.accepted(min(len(new), len(cand[0])), len(new) - 1)
    state.seq += new
    return new


def shape_costs(model: torch.nn.Module, drafts: list[tuple[int, int]], target: tuple[int, int]
                ) -> dict[str, float]:
    """Relative costs from the parameters each step reads: a plain step and a verification
    run the target's level, a draft step every draft level (a lone draft only its own)."""
    def level(lv: int, lone: bool) -> float:
        return model.num_params(lv) * (1 if lone else model.nest.count(lv))

    full = level(target[0], model.nest.count(target[0]) == 1)
    by_level = Counter(lv for lv, _ in drafts)
    draft = sum(level(lv, n == 1) for lv, n in by_level.items())
    return {"plain": 1.0, "verify": 1.0, "draft": draft / full}


def draft_is_unsure(q: torch.Tensor, x: torch.Tensor, confidence: float) -> bool:
    """Whether every row gave its own latest token ``x`` (n,) less than ``confidence``
    probability under its distribution ``q`` (n, V)."""
    return float(q.gather(-1, x.view(-1, 1)).max()) < confidence


def commit_row(cache: KVCache, src: int, start: int, keep: int, groups: int = 1) -> None:
    """Keep positions ``< keep``; positions ``start .. keep`` of every row become row ``src``'s.

    The cache's rows are ``groups`` blocks (one per sub-model of the level) of one row per
    candidate; the copy happens inside every block.
    """
    for kv in (cache.k, cache.v):
        blocks = kv.view(kv.shape[0], groups, kv.shape[1] // groups, *kv.shape[2:])
        blocks[:, :, :, :, start:keep] = blocks[:, :, src:src + 1, :, start:keep]
    cache.length = keep


def check_speculation(model: torch.nn.Module, drafts: list[tuple[int, int]], target: tuple[int, int],
                      gamma: int, prompt: list[int], confidence: float = 0.0) -> None:
    """Raise a FractalError for arguments ``speculate`` rejects (before any work is done)."""
    if not prompt:
        raise FractalError("the prompt is empty")
    if not drafts:
        raise FractalError("speculative decoding needs at least one draft")
    if gamma < 1:
        raise FractalError(f"gamma must be at least 1, got {gamma}")
    if not 0.0 <= confidence <= 1.0:
        raise FractalError(f"confidence must lie in [0, 1], got {confidence}")
    if model.body_levels() == [0] and model.nest.levels > 1:
        raise FractalError(f"family {model.config.family}: every sub-model reads the full model's body, so "
                           f"a smaller one drafts at the full cost; speculation needs family fractal or "
                           f"matformer")
    for lv, j in [*drafts, target]:
        model.nest.check(lv, j)
        if model.needed_levels(lv) != [lv]:
            raise FractalError(f"sub-model ({lv}, {j}) reads other levels (residual="
                               f"{model.config.nesting.residual}); speculation needs standalone sub-models")
    for lv, j in drafts:
        if lv <= target[0]:
            raise FractalError(f"draft ({lv}, {j}) is not smaller than the target {target}: a draft must "
                               f"come from a deeper level")
    if len(set(drafts)) != len(drafts):
        raise FractalError("each draft may be given once")
