from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from fractalformer import FractalError
from fractalformer.config import ModelConfig
from fractalformer.generate import SpecStats, generate, speculate
from fractalformer.generate.spec_policy import Policy, best_gamma, expected_tokens, known_costs
from fractalformer.generate.speculative import commit_row, parse_sub_model
from fractalformer.models import build_model
from fractalformer.nn import KVCache
from fractalformer.nn.decode import frozen_weights


def model(vocab: int = 40, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(family="fractal", levels=3, vocab_size=vocab, block_size=48, n_layer=2, d_model=32, n_head=2,
               n_kv_head=1, head_dim=16, mlp_mult=2.0)
    m = build_model(ModelConfig.of(**{**cfg, **kw})).eval()
    with torch.no_grad():  # peaked, different distributions per sub-model
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


@pytest.mark.parametrize("drafts", [[(2, 0)], [(1, 1)], [(2, 0), (2, 3)], [(1, 0), (2, 1), (2, 2)]])
@pytest.mark.parametrize("gamma", [pytest.param(1, marks=pytest.mark.slow), 3,
                                   pytest.param(6, marks=pytest.mark.slow)])
def test_greedy_equals_plain_greedy(drafts, gamma: int) -> None:
    m = model()
    for prompt in ([1, 2, 3, 4, 5], [7], list(range(30))):
        plain = list(generate(m, prompt, 40, temperature=0))  # runs past the 48-token context
        for adaptive in (False, True):
            assert list(speculate(m, prompt, 40, drafts, gamma, temperature=0, adaptive=adaptive)) == plain


def test_decoding_keeps_its_shortcuts_in_the_block_not_on_the_modules() -> None:
    m = model()
    before = {id(mod): set(vars(mod)) for mod in m.modules()}
    with frozen_weights() as block:
        out = list(speculate(m, [1, 2, 3], 12, [(1, 0), (2, 1), (2, 2)], 3, temperature=0, adaptive=False))
    assert out == list(generate(m, [1, 2, 3], 12, temperature=0))
    assert {id(mod): set(vars(mod)) for mod in m.modules()} == before
    assert len(block.kept) > 1  # slices and norm scales of the drafting level, the extracted draft


@pytest.mark.parametrize("drafts", [[(2, 1)], [(1, 0), (2, 1), (2, 2)]])
def test_confident_drafts_stop_early_and_stay_exact(drafts) -> None:
    m = model()
    for prompt in ([1, 2, 3, 4, 5], list(range(30))):
        plain = list(generate(m, prompt, 40, temperature=0))
        stats = SpecStats()
        assert list(speculate(m, prompt, 40, drafts, 6, temperature=0, adaptive=False, confidence=0.1,
                              stats=stats)) == plain
        assert min(stats.gammas) < max(stats.gammas)  # some drafts did stop early


@pytest.mark.parametrize("target,drafts", [((1, 1), [(2, 2), (2, 3)]), ((1, 0), [(2, 0), (2, 1), (2, 3)])])
def test_target_can_be_a_sub_model(target, drafts) -> None:
    m = model()
    for prompt in ([3, 1], [5, 9, 2, 7]):
        plain = list(generate(m, prompt, 40, temperature=0, level=target[0], index=target[1]))
        assert list(speculate(m, prompt, 40, drafts, 3, target=target, temperature=0)) == plain


def test_commit_row_rolls_every_row_back_to_the_winner() -> None:
    cache = KVCache(2, 3, 1, 10, 4, "cpu", torch.float32)
    cache.k.normal_()
    cache.v.normal_()
    before = cache.k.clone()
    commit_row(cache, 2, 4, 7)
    assert cache.length == 7
    assert torch.equal(cache.k[:, :, :, :4], before[:, :, :, :4])  # the shared prefix is untouched
    for row in range(3):
        assert torch.equal(cache.k[:, row, :, 4:7], before[:, 2, :, 4:7])
        assert torch.equal(cache.v[:, row, :, 4:7], cache.v[:, 2, :, 4:7])


def exact_dist(m, prompt: list[int], top_k: int | None, length: int) -> dict[tuple[int, ...], float]:
    """The target's exact distribution of its next ``length`` tokens (temperature 1)."""
    from fractalformer.generate import probabilities

    with torch.no_grad():
        p = probabilities(m(torch.tensor([prompt]))[0][0, 0, -1], 1.0, top_k)
        out = {(a,): float(p[a]) for a in range(len(p)) if p[a] > 0}
        for _ in range(length - 1):
            nxt = {}
            for seq, ps in out.items():
                p = probabilities(m(torch.tensor([[*prompt, *seq]]))[0][0, 0, -1], 1.0, top_k)
                nxt |= {(*seq, b): ps * float(p[b]) for b in range(len(p)) if p[b] > 0}
            out = nxt
    return out


def chi_square_rejects(counts: Counter, expected: dict, n: int) -> bool:
    """Chi-square goodness of fit at alpha = 1e-4 (Wilson-Hilferty quantile), small cells pooled."""
    big = [k for k, p in expected.items() if p * n >= 5]
    obs = [counts[k] for k in big] + [n - sum(counts[k] for k in big)]
    exp = [expected[k] * n for k in big] + [n * (1 - sum(expected[k] for k in big))]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True) if e > 0)
    dof = len(big)
    z = 3.719  # one-sided 1e-4
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat > critical


@pytest.mark.slow
@pytest.mark.parametrize("drafts,gamma,top_k,length,confidence", [
    ([(1, 0)], 2, None, 2, 0.0),
    ([(1, 0), (2, 3), (2, 1)], 2, 4, 2, 0.0),
    ([(2, 3)], 3, None, 3, 0.5),  # three tokens: drafts of length 2 that may stop after one
])
def test_sampling_is_distributed_as_the_target(drafts, gamma: int, top_k: int | None, length: int,
                                               confidence: float) -> None:
    m = model(vocab=6)
    prompt = [1, 2, 3]
    expected = exact_dist(m, prompt, top_k, length)
    n = 1200
    counts: Counter = Counter()
    stats = SpecStats()
    with frozen_weights():  # the weights stay put: drafts are extracted once for all n runs
        for seed in range(n):
            counts[tuple(speculate(m, prompt, length, drafts, gamma, temperature=1.0, top_k=top_k,
                                   seed=seed, adaptive=False, confidence=confidence, stats=stats))] += 1
    assert 0.05 < stats.alpha < 0.95  # drafts are both accepted and rejected: the test has teeth
    if confidence:  # some drafts stopped early: fewer draft steps per generation
        eager, m_eager = SpecStats(), 200
        with frozen_weights():
            for seed in range(m_eager):
                list(speculate(m, prompt, length, drafts, gamma, temperature=1.0, seed=seed, adaptive=False,
                               stats=eager))
        assert stats.draft_calls / n < 0.95 * eager.draft_calls / m_eager
    assert not chi_square_rejects(counts, expected, n)
    # the same test does reject a sampler that is off (the draft's own distribution), even
    # from a quarter of the samples (its statistic is 3-30x the critical value there)
    with frozen_weights():  # extracted once, not per run
        draft_counts = Counter(tuple(generate(m, prompt, length, 1.0, top_k, seed=s, level=1, index=0))
                               for s in range(n // 4))
    assert chi_square_rejects(draft_counts, expected, n // 4)


def test_best_gamma_weighs_draft_verify_and_plain_costs() -> None:
    # (alpha, draft step, verify round, plain step): drafting pays only with cheap drafts that agree
    assert best_gamma(0.9, 0.1, 1.0, 1.0, 8) >= 4
    assert best_gamma(0.1, 0.8, 1.0, 1.0, 8) == 0
    assert best_gamma(0.0, 0.05, 1.0, 1.0, 8) == 0
    assert best_gamma(0.9, 0.1, 1.0, 0.2, 8) == 0  # verifying costs 5 plain steps: never worth it
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_policy_measures_then_drafts_only_while_it_pays() -> None:
    p = Policy(4, adaptive=True, stats=SpecStats())
    assert p.gamma() == 0  # plain decoding is measured first (the first call warms up)
    p.timed("plain", 5.0)
    p.timed("plain", 1.0)
    assert p.gamma() == 2 and p.cost["plain"] == 1.0 and p.stats.plain_time == 6.0  # short: costs unknown
    for _ in range(2):
        p.timed("draft", 0.1)
        p.timed("verify", 1.5)
        p.accepted(4, 4)
    assert p.gamma() == 4
    p.accepted(32, 0)  # the recent acceptance collapses: back off to plain decoding, then probe again
    assert p.gamma() == 0 and p.plain_left == 32 and not p.recent  # probes start afresh
    assert [p.gamma() for _ in range(32)] == [0] * 32
    assert p.gamma() == 4
    p.accepted(32, 32)
    assert p.gamma() > 0
    p.timed("draft", 100.0)  # drafting can never pay now: stop probing
    assert p.gamma() == 0 and p.plain_left > 10**6
    assert Policy(3, adaptive=False, stats=SpecStats()).gamma() == 3


def test_costs_measured_once_serve_later_generations() -> None:
    slow = {"plain": 1.0, "draft": 0.9, "verify": 1.7}  # drafting cannot pay
    p = Policy(4, adaptive=True, stats=SpecStats(), costs=dict(slow))
    assert p.gamma() == 0 and p.plain_left > 10**6  # no short rounds to measure them again
    fast = Policy(4, adaptive=True, stats=SpecStats(), costs={"plain": 1.0, "draft": 0.05, "verify": 1.1})
    assert fast.gamma() == 4  # drafts at once, judging acceptance as it goes
    m = model()
    drafts, prompt = [(2, 0)], [1, 2, 3, 4, 5]
    plain = list(generate(m, prompt, 30, temperature=0))
    first = SpecStats()
    assert list(speculate(m, prompt, 30, drafts, 4, temperature=0, stats=first)) == plain
    known = known_costs(m, (tuple(drafts), (0, 0), False, torch.get_num_threads()))
    assert set(known) == {"plain", "draft", "verify"} and first.rounds >= 2  # measured by this generation
    known.update(slow)  # as if they had come out this way: the next generation does not draft at all
    later = SpecStats()
    assert list(speculate(m, prompt, 30, drafts, 4, temperature=0, stats=later)) == plain
    assert later.rounds == 0 and later.plain_tokens == 30


def test_policy_stops_at_once_when_the_costs_rule_drafting_out() -> None:
    p = Policy(4, adaptive=True, stats=SpecStats())
    for kind, sec in [("plain", 1.0), ("plain", 1.0), ("draft", 0.9), ("verify", 1.7), ("draft", 0.9),
                      ("verify", 1.7)]:
        p.timed(kind, sec)
    p.accepted(4, 4)  # too few positions to judge acceptance, but no acceptance could pay:
    assert p.gamma() == 0 and p.plain_left > 10**6  # 5 tokens for 4 x 0.9 + 1.7 > 5 plain steps
    q = Policy(4, adaptive=True, stats=SpecStats())  # near break-even only at alpha 1: stops too
    for kind, sec in [("plain", 1.0), ("plain", 1.0), ("draft", 0.7), ("verify", 1.6), ("draft", 0.7),
                      ("verify", 1.6)]:
        q.timed(kind, sec)
    assert best_gamma(1.0, 0.7, 1.6, 1.0, 4) and q.gamma() == 0 and q.plain_left > 10**6


@pytest.mark.slow
def test_compiled_speculation_equals_plain_greedy() -> None:
    """Drafts and target through torch.compile (traced with the aot_eager backend): still
    token for token plain greedy decoding (shapes change with the round and cache length)."""
    m = model()
    prompt = [1, 2, 3, 4, 5]
    plain = list(generate(m, prompt, 24, temperature=0))
    assert list(speculate(m, prompt, 24, [(2, 0)], 3, adaptive=False, compile="aot_eager")) == plain


def test_row_views_share_memory() -> None:
    cache = KVCache(2, 6, 1, 10, 4, "cpu", torch.float32)  # 2 groups x 3 candidate rows
    view = cache.rows(2, 1)
    assert view.k.shape == (2, 2, 1, 10, 4)
    view.length = 3
    view.update(1, torch.ones(2, 1, 2, 4), torch.ones(2, 1, 2, 4), view.where(2)[0])
    assert cache.k[1, [0, 3], :, 3:5].eq(1).all() and cache.k.sum() == 2 * 2 * 4
    assert cache.v[1, [0, 3], :, 3:5].eq(1).all() and cache.v.sum() == 2 * 2 * 4
    one = KVCache(1, 3, 1, 10, 4, "cpu", torch.float32)
    two = one.rows(1, 2)
    two.update(0, torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4), two.where(1)[0])
    assert one.k[0, :2, :, 0].eq(1).all() and one.k[0, 2].eq(0).all()
    with pytest.raises(ValueError):
        cache.rows(2, 2)


@pytest.mark.parametrize("spec,match", [
    ("3:0", "level 3 is out of range"), ("2:4", "index 4 is out of range"),
    ("2-1", "LEVEL:INDEX"), ("x", "LEVEL:INDEX"), ("\u00b2:0", "LEVEL:INDEX"),
    ("2:0" + "0" * 5000, "LEVEL:INDEX"),
])
def test_bad_draft_specs(spec: str, match: str) -> None:
    with pytest.raises(FractalError, match=match):
        parse_sub_model(spec, model())


def test_drafts_must_be_smaller_standalone_sub_models() -> None:
    m = model()
    with pytest.raises(FractalError, match="not smaller"):
        list(speculate(m, [1], 5, [(0, 0)], 2))
    with pytest.raises(FractalError, match="not smaller"):
        list(speculate(m, [1], 5, [(1, 0)], 2, target=(1, 1)))
    up = model(residual="upstream")
    with pytest.raises(FractalError, match="standalone"):
        list(speculate(up, [1], 5, [(2, 0)], 2))


@pytest.mark.slow
def test_speculate_cli(capsys, fractal_run) -> None:
    from .conftest import run_cli

    code, out, _ = run_cli(capsys, "speculate", fractal_run, "--draft", "2:0", "--draft", "2:1",
                           "--gamma", "3", "--prompt", "KING:", "--max-new-tokens", "12", "--json",
                           "--compare")
    report = json.loads(out)
    assert code == 0 and report["text"].startswith("KING:") and report["tokens"] == 12
    assert {"alpha", "tokens_per_target_call", "cost_ratio_c", "tokens_per_s", "speedup"} <= report.keys()
    code, plain, _ = run_cli(capsys, "sample", fractal_run, "--prompt", "KING:", "--max-new-tokens", "12",
                             "--temperature", "0")
    assert plain.rstrip("\n") == report["text"]
    for args, match in ((["--draft", "0:0"], "not smaller"), (["--draft", "2:7"], "index 7 is out of range"),
                        (["--draft", "two"], "LEVEL:INDEX"), (["--draft", "2:0", "--gamma", "0"], "gamma"),
                        (["--draft", "2:0", "--confidence", "2"], "confidence")):
        code, _, err = run_cli(capsys, "speculate", fractal_run, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and match in err


def test_draft_stops_when_every_row_is_unsure_of_its_own_token() -> None:
    """The early-stop rule reads the probability each row gave the token it drew, not the
    row's largest probability (they differ when sampling)."""
    from fractalformer.generate.speculative import draft_is_unsure

    q = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    assert draft_is_unsure(q, torch.tensor([1, 1]), 0.5)  # both drew an unlikely token
    assert not draft_is_unsure(q, torch.tensor([1, 0]), 0.5)  # row 1 is sure of its own token
    assert not draft_is_unsure(q, torch.tensor([0, 1]), 0.5)


class FakeClock:
    """``time.perf_counter`` for the speculative module: each call advances by the next step."""

    def __init__(self, steps: list[float]) -> None:
        self.steps, self.now, self.calls = steps, 0.0, 0

    def perf_counter(self) -> float:
        self.now += self.steps[self.calls % len(self.steps)]
        self.calls += 1
        return self.now


def test_seeded_adaptive_sampling_does_not_depend_on_timings(monkeypatch) -> None:
    """Timings steer the adaptive policy; with a seed its choices (and so the text) must not
    depend on them: two runs whose clocks disagree about every cost give the same tokens."""
    from fractalformer.generate import speculative

    m = model()
    runs = []
    for steps in ([0.001, 0.5, 0.02], [0.3, 0.001, 0.9, 0.05]):
        monkeypatch.setattr(speculative, "time", FakeClock(steps))
        stats = SpecStats()
        runs.append((list(speculate(m, [1, 2, 3], 40, [(2, 0)], 4, temperature=1.0, seed=5, stats=stats)),
                     stats.gammas))
    assert runs[0] == runs[1] and runs[0][1]  # same tokens, same rounds, and it did draft
    unseeded = []
    for steps in ([0.001, 0.5, 0.02], [0.3, 0.001, 0.9, 0.05]):  # without a seed the clock still steers
        monkeypatch.setattr(speculative, "time", FakeClock(steps))
        stats = SpecStats()
        list(speculate(m, [1, 2, 3], 40, [(2, 0)], 4, temperature=1.0, stats=stats))
        unseeded.append(stats.gammas)
    assert unseeded[0] != unseeded[1]


def test_compare_times_both_passes_warm(capsys, monkeypatch, tmp_path) -> None:
    """Each timed pass of --compare follows an untimed pass of the same kind."""
    from fractalformer import generate as gen
    from fractalformer.checkpoint import save_checkpoint
    from fractalformer.config import build_config
    from fractalformer.data.tokenizers import get_tokenizer
    from fractalformer.runs import save_run_config
    from fractalformer.train import make_optimizer

    from .conftest import run_cli

    run = tmp_path / "run"
    cfg = build_config("tiny-fractal", None, ["block_size=32"])
    save_run_config(run, cfg, get_tokenizer("bpe128"))
    model = build_model(cfg.model)
    save_checkpoint(run, dict(model.state_dict()), make_optimizer(model, cfg), {"step": 0, "elapsed_s": 0.0})
    calls: list[tuple[str, int]] = []

    def spy(name: str, fn):
        def wrapped(model, prompt, n, *args, **kw):
            calls.append((name, n))
            return fn(model, prompt, n, *args, **kw)
        return wrapped

    monkeypatch.setattr(gen, "speculate", spy("speculate", gen.speculate))
    monkeypatch.setattr(gen, "generate", spy("generate", gen.generate))
    code, out, err = run_cli(capsys, "speculate", run, "--draft", "2:0", "--max-new-tokens", 40, "--compare",
                             "--json")
    assert code == 0, err
    assert calls == [("speculate", 16), ("generate", 16), ("speculate", 40), ("generate", 40)]
    assert json.loads(out)["speedup"] > 0
