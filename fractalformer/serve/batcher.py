"""The scheduler: one thread owns the model and decodes every active request together.

Requests wait in a bounded queue (``submit`` refuses when it is full, so load cannot
exhaust memory). Each iteration of the scheduler

1. admits queued requests while fewer than ``max_batch`` are active, prefilling each
   prompt alone (exactly as :func:`~fractalformer.generate.generate` does) and emitting
   its first token;
2. for every *group* - the requests that run through the same model and levels - runs
   ONE batched forward of one token per request. The group's KV cache holds one row per
   request with per-row lengths, so requests at different positions decode together
   and each row attends only to its own keys; rows are gathered into a new cache only
   when the group's membership changes (a request joins, finishes or is cancelled);
   A request whose text outgrows the context leaves the batch: its window slides, and
   each of its steps recomputes the last ``block_size`` tokens alone, exactly as
   :func:`~fractalformer.generate.generate` does;
3. advances every speculative request by one token on its own path
   (:func:`~fractalformer.generate.speculate` is a per-sequence algorithm; interleaving
   it with the batched steps keeps it from stalling them).

A single sub-model of a level that stands alone is served by its extracted dense model
(only its own weights: the other sub-models of the level are not computed); a level
ensemble, or a sub-model that reads other levels, runs the nested model itself.
Sampling is per request, with the request's own seeded generator and the same
``sample_next`` as the library, so a request's tokens do not depend on what it is
batched with (greedy: identical to decoding it alone; see tests/test_serve.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import FractalError
from ..generate import SpecStats, speculate
from ..generate.sampling import fresh_seed, runner, sample_next, select_logits
from ..models.gpt import Caches
from ..nn.decode import frozen_weights

Target = tuple[int, int | str]  # (level, index) or (level, "ensemble")


@dataclass(frozen=True)
class Token:
    """One generated token; ``drafted`` says (speculative requests only) whether a draft
    proposed it and the target accepted it."""

    id: int
    drafted: bool | None = None


@dataclass(frozen=True)
class Finished:
    """The request produced all its tokens; ``stats`` are timings (and speculation figures)."""

    stats: dict


@dataclass(frozen=True)
class Failed:
    """The request could not be served; ``status`` is the HTTP status that fits."""

    message: str
    status: int = 500


Event = Token | Finished | Failed


@dataclass
class Job:
    """One completion request as the scheduler sees it. ``emit`` is called from the
    scheduler thread with every event; setting ``cancelled`` (a client went away) makes
    the scheduler drop the request at its next iteration."""

    prompt: list[int]
    max_tokens: int
    target: Target
    emit: Callable[[Event], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    drafts: list[tuple[int, int]] = field(default_factory=list)  # speculative decoding when given
    gamma: int = 4
    adaptive: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


class QueueFull(Exception):
    """The request queue is full: the caller should answer 503 and the client retry later."""


@dataclass(eq=False)
class _Row:
    """An active batched request: its sampler, its text (``seq[-1]`` is the token to feed
    next), its own prefill cache until it is gathered into the group's batched cache."""

    job: Job
    select: Target  # which logits of the runner's output speak
    gen: torch.Generator
    seq: list[int]
    caches: Caches | None
    window: Caches | None = None  # once the text outgrows the context: the sliding window's cache
    emitted: int = 1
    started: float = 0.0
    first: float = 0.0


@dataclass(eq=False)
class _Group:
    """Requests sharing a runner (model) and levels: one forward per step for all of them."""

    runner: torch.nn.Module
    levels: list[int]
    rows: list[_Row] = field(default_factory=list)
    members: list[_Row] = field(default_factory=list)  # the rows ``caches`` holds, in order
    caches: Caches | None = None


@dataclass(eq=False)
class _Solo:
    """A speculative request: its generator and the stats that tell drafted tokens apart."""

    job: Job
    tokens: Iterator[int]
    stats: SpecStats
    started: float
    first: float = 0.0
    emitted: int = 0
    rounds: int = 0  # stats.rounds / accepted when the current round's tokens began
    accepted: int = 0
    drafted_left: int = 0  # tokens of the current round still to come that a draft proposed


class Batcher:
    """Dynamic batching over a shared model; see the module docstring."""

    def __init__(self, model: torch.nn.Module, max_batch: int = 16, queue_size: int = 64) -> None:
        if max_batch < 1 or queue_size < 1:
            raise FractalError("max_batch and queue_size must be at least 1")
        self.model, self.max_batch = model.eval(), max_batch
        self.device = next(model.parameters()).device
        self.pending: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.groups: dict[tuple[int, tuple[int, ...]], _Group] = {}
        self.solo: list[_Solo] = []
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "peak_batch": 0}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._scope = frozen_weights()  # weights do not change while serving: gather slices once
        self._lock = threading.RLock()  # the scheduler's state, for jobs() from other threads
        self.active = 0  # admitted requests after the latest iteration (read without the lock)

    # -- the outside: submit, start, stop, look ------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` instead of waiting."""
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self.pending.maxsize} waiting)") from None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fractalformer-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def jobs(self) -> list[Job]:
        """The active (admitted) requests (waits for the scheduler's current iteration)."""
        with self._lock:
            return self._jobs()

    def status(self) -> dict:
        """Counts for /health; never waits for the scheduler (the event loop calls it)."""
        return {"active": self.active, "queued": self.pending.qsize(), **self.counts}

    # -- the scheduler thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.step():
                try:  # idle: wait for work (waking up now and then to see a stop)
                    job = self.pending.get(timeout=0.2)
                except queue.Empty:
                    continue
                with self._lock, torch.no_grad(), self._scope:
                    self._admit(job)
                    self.active = len(self._jobs())

    @torch.no_grad()
    def step(self) -> bool:
        """One scheduler iteration; returns whether any request is still active."""
        with self._lock, self._scope:
            return self._step()

    def _jobs(self) -> list[Job]:
        return [r.job for g in self.groups.values() for r in g.rows] + [s.job for s in self.solo]

    def _step(self) -> bool:
        while len(self._jobs()) < self.max_batch:
            try:
                job = self.pending.get_nowait()
            except queue.Empty:
                break
            self._admit(job)
        for key, group in list(self.groups.items()):
            try:
                self._decode(group)
            except Exception as e:  # a bug or an exhausted machine: fail these requests, keep serving
                for row in group.rows:
                    self._fail(row.job, f"decoding failed: {e}")
                group.rows.clear()
            if not group.rows:
                del self.groups[key]
        for solo in list(self.solo):
            self._advance(solo)
        self.active = len(self._jobs())
        return self.active > 0

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            return
        try:
            if job.drafts:
                self._start_solo(job)
            else:
                self._prefill(job)
        except FractalError as e:
            self._fail(job, str(e), 400)
        except Exception as e:
            self._fail(job, f"prefill failed: {e}")

    def _runner(self, target: Target) -> tuple[torch.nn.Module, list[int], Target]:
        """The model that computes ``target``, the levels it runs, and what to read from them
        (a lone sub-model: its extracted dense model, kept while the server runs)."""
        m, level, index = runner(self.model, *target)
        return m, m.needed_levels(level), (level, index)

    def _prefill(self, job: Job) -> None:
        runner, levels, select = self._runner(job.target)
        started = time.perf_counter()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(job.seed if job.seed is not None else fresh_seed())
        caches = runner.new_cache(1, levels)
        logits = runner(torch.tensor([job.prompt], device=self.device), levels, caches)
        row = _Row(job, select, gen, list(job.prompt), caches, started=started)
        row.seq.append(self._sample(job, select, logits, 0, gen))
        row.first = time.perf_counter()
        job.emit(Token(row.seq[-1]))
        if job.max_tokens == 1:
            self._finish(job, started, row.first, 1)
            return
        key = (id(runner), tuple(levels))
        self.groups.setdefault(key, _Group(runner, levels)).rows.append(row)

    @staticmethod
    def _sample(job: Job, select: Target, logits: dict[int, torch.Tensor], b: int,
                gen: torch.Generator) -> int:
        level, index = select
        lg = select_logits({level: logits[level][:, b : b + 1]}, level, index)
        return int(sample_next(lg, job.temperature, job.top_k, job.top_p, gen))

    def _decode(self, g: _Group) -> None:
        for row in [r for r in g.rows if r.job.cancelled.is_set()]:
            g.rows.remove(row)
            self.counts["cancelled"] += 1
        if not g.rows:
            return
        ctx = g.runner.config.block_size
        batched = [r for r in g.rows if len(r.seq) <= ctx]  # the others' windows slide
        sliding = [r for r in g.rows if len(r.seq) > ctx]
        if batched:
            if batched != g.members:
                g.caches = self._gather(g, batched)
                g.members = batched
            self.counts["peak_batch"] = max(self.counts["peak_batch"], len(batched))
            idx = torch.tensor([[r.seq[-1]] for r in batched], device=self.device)
            logits = g.runner(idx, g.levels, g.caches)
            for b, row in enumerate(batched):
                self._emit(g, row, logits, b)
        for row in sliding:  # recompute the last ``ctx`` tokens, as generate() does past the context
            row.seq = row.seq[-ctx:]
            if row.window is None:  # a row never gathered has its prefill cache to reuse
                row.window, row.caches = row.caches or g.runner.new_cache(1, g.levels), None
            for c in row.window.values():
                c.length = 0
            logits = g.runner(torch.tensor([row.seq], device=self.device), g.levels, row.window)
            self._emit(g, row, logits, 0)

    def _emit(self, g: _Group, row: _Row, logits: dict[int, torch.Tensor], b: int) -> None:
        """Sample ``row``'s next token from row ``b`` of ``logits``; finish it at its last."""
        row.seq.append(self._sample(row.job, row.select, logits, b, row.gen))
        row.emitted += 1
        row.job.emit(Token(row.seq[-1]))
        if row.emitted == row.job.max_tokens:
            g.rows.remove(row)
            self._finish(row.job, row.started, row.first, row.emitted)

    def _gather(self, g: _Group, rows: list[_Row]) -> Caches:
        """A batched cache whose row b holds ``rows[b]``'s keys and values, with its length;
        a new row's come from its prefill cache, a member's from the old batch."""
        sources = [(r.caches, 0) if r.caches is not None else (g.caches, g.members.index(r)) for r in rows]
        out = g.runner.new_cache(len(sources), g.levels)
        for lv, cache in out.items():
            n = g.runner.nest.count(lv)
            dst = (cache.k.unflatten(1, (n, -1)), cache.v.unflatten(1, (n, -1)))
            lengths = []
            for i, (caches, b) in enumerate(sources):
                src = caches[lv]
                length = src.length if isinstance(src.length, int) else int(src.length[b])
                for d, s in zip(dst, (src.k, src.v), strict=True):
                    d[:, :, i, :, :length] = s.unflatten(1, (n, -1))[:, :, b, :, :length]
                lengths.append(length)
            cache.length = torch.tensor(lengths, device=self.device).repeat(n)
        for r in rows:
            r.caches = None
        return out

    def _start_solo(self, job: Job) -> None:
        stats = SpecStats()
        level, index = job.target
        tokens = speculate(self.model, job.prompt, job.max_tokens, job.drafts, job.gamma,
                           (level, int(index)), job.temperature, job.top_k, job.top_p, job.seed,
                           adaptive=job.adaptive, stats=stats)
        self.solo.append(_Solo(job, tokens, stats, time.perf_counter()))

    def _advance(self, s: _Solo) -> None:
        if s.job.cancelled.is_set():
            self.solo.remove(s)
            s.tokens.close()
            self.counts["cancelled"] += 1
            return
        try:
            tok = next(s.tokens)
        except FractalError as e:
            self.solo.remove(s)
            self._fail(s.job, str(e), 400)
            return
        except Exception as e:
            self.solo.remove(s)
            self._fail(s.job, f"speculative decoding failed: {e}")
            return
        st = s.stats
        if st.rounds != s.rounds:  # a new round: its first (accepted) tokens were drafted
            s.drafted_left = st.accepted - s.accepted
            s.rounds, s.accepted = st.rounds, st.accepted
        drafted = s.drafted_left > 0
        s.drafted_left -= drafted
        s.emitted += 1
        if s.emitted == 1:
            s.first = time.perf_counter()
        s.job.emit(Token(tok, drafted))
        if s.emitted == s.job.max_tokens:
            self.solo.remove(s)
            s.tokens.close()
            self._finish(s.job, s.started, s.first, s.emitted,
                         {**st.to_json(), "examined": st.examined, "accepted": st.accepted})

    def _finish(self, job: Job, started: float, first: float, n: int, extra: dict | None = None) -> None:
        end = time.perf_counter()
        self.counts["completed"] += 1
        job.emit(Finished({
            "queue_s": round(started - job.submitted, 4),
            "time_to_first_token_s": round(first - job.submitted, 4),
            "decode_tokens_per_s": round((n - 1) / (end - first), 1) if n > 1 and end > first else None,
            "tokens_per_s": round(n / (end - job.submitted), 1),
            **({"speculative": extra} if extra is not None else {}),
        }))

    def _fail(self, job: Job, message: str, status: int = 500) -> None:
        self.counts["failed"] += 1
        job.emit(Failed(message, status))
