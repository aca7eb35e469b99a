"""The next-concept predictor: causality (perturbation, Jacobian, leak canary), cached
generation, growth, configs and the command line."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import fractalformer
from fractalformer.config import build_config
from fractalformer.errors import FractalError
from fractalformer.export import dense_model
from fractalformer.generate import generate
from fractalformer.models import build_model
from fractalformer.models.concept import ConceptGPT, grow
from fractalformer.train import train
from fractalformer.train.losses import family_loss, training_loss

from .conftest import assert_resume_is_exact, assert_two_processes_match_one, needs_torchrun, run_cli

TINY_CONCEPT = ["--preset", "tiny", "--quiet", "--set", "family=concept", "--set", "sample_tokens=0"]

# every configuration the family offers: read, combiner, sharing, loss, levels, group sizes
CONFIGS = {
    "cross": [],
    "add": ["concept_read=add"],
    "shared": ["concept_share=true", "concept_layers=1"],
    "sum_mse": ["combiner=sum", "concept_loss=mse"],
    "l1_no_loss_level": ["concept_levels=2", "combo=2,3", "concept_loss=l1", "concept_weight=0,1"],
    "three_levels_shared_add": ["concept_levels=3", "combo=2", "concept_share=true", "concept_read=add"],
    # the concept-byte preset's shape: shared blocks, the first one per concept level, plans added
    "lean": ["concept_levels=3", "combo=2", "concept_share=true", "concept_layers=1", "concept_read=add"],
    "combo8": ["combo=8", "combiner=linear"],
    # a sliding 4-token window at the token level, two concept levels reading the whole block
    "token_window": ["token_window=4", "concept_levels=2", "combo=2,3", "combiner=linear"],
}


def tiny(sets: list[str], seed: int = 0) -> ConceptGPT:
    """A tiny concept model whose read path is open (read_scale 1), so that every causality
    test exercises it: the default closed gate would hide a leak until training opens it."""
    torch.manual_seed(seed)
    model = build_model(build_config("tiny", None, ["family=concept", "concept_read_init=1", "dropout=0",
                                                    *sets]).model)
    assert isinstance(model, ConceptGPT)
    return model


def leaky_plan_of(self: ConceptGPT, pos: torch.Tensor, level: int) -> torch.Tensor:
    """The plan one concept ahead (made from the unit's own concept, future units included):
    the seed v11.3's leak, for checking that the tests catch it (full forward only)."""
    c = self.combo[level]
    return torch.clamp(pos // c + 1, max=int(pos[-1]) // c)


def boundary_plan_of(self: ConceptGPT, pos: torch.Tensor, level: int) -> torch.Tensor:
    """An off-by-one at concept boundaries: the unit one before a concept's last reads the plan
    the concept's completion makes, so it sees one future unit, at one position per concept."""
    c = self.combo[level]
    early = (pos % c == c - 2).long()
    return torch.clamp(pos // c + early, max=int(pos[-1]) // c)


LEAKS = {"next concept": leaky_plan_of, "boundary": boundary_plan_of}
MODES = ["eval", "train"]  # train mode with dropout off: what differs is the training path itself


@torch.no_grad()
def perturbation_leak(model: ConceptGPT, t_len: int = 30, mode: str = "eval") -> float:
    """Largest change of the logits at positions <= t when only tokens after t change."""
    model.train(mode == "train")
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (2, t_len), generator=gen)
    base = model(x, [0])[0][0]
    worst = 0.0
    for t in range(t_len - 1):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, model.config.vocab_size, (2, t_len - t - 1), generator=gen)
        worst = max(worst, float((model(y, [0])[0][0][:, : t + 1] - base[:, : t + 1]).abs().max()))
    return worst


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CONFIGS)
def test_perturbing_the_future_leaves_the_past_unchanged(name: str, mode: str) -> None:
    model = tiny(CONFIGS[name])
    # 30 tokens: not a multiple of any group size, so a trailing incomplete concept is included
    assert perturbation_leak(model, mode=mode) == 0.0
    x = torch.randint(0, 128, (1, 30))
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % 128  # the present and past do change what comes after
    a, b = model(x, [0])[0][0, 0], model(y, [0])[0][0, 0]
    assert torch.equal(a[:9], b[:9]) and not torch.allclose(a[9:], b[9:])


def jacobian(model: ConceptGPT, t_len: int, mode: str = "eval") -> torch.Tensor:
    """J[t, s] = |d (random projection of logits at t) / d (embedding at s)|, summed."""
    model.train(mode == "train")
    emb: list[torch.Tensor] = []

    def keep(_: torch.nn.Module, __: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.detach().requires_grad_(True)
        emb.append(out)
        return out

    handle = model.embed.register_forward_hook(keep)
    x = torch.randint(0, model.config.vocab_size, (1, t_len), generator=torch.Generator().manual_seed(2))
    logits = model(x, [0])[0][0, 0]
    handle.remove()
    proj = torch.randn(logits.shape[-1], generator=torch.Generator().manual_seed(3))
    rows = []
    for t in range(t_len):
        (g,) = torch.autograd.grad(logits[t] @ proj, emb[0], retain_graph=True)
        rows.append(g[0, 0].abs().sum(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CONFIGS)
def test_jacobian_is_lower_triangular(name: str, mode: str) -> None:
    j = jacobian(tiny(CONFIGS[name]), 26, mode)
    assert float(j.triu(1).abs().max()) == 0.0  # no output depends on a later input
    assert bool((j.diagonal() > 0).all())  # and every output depends on its own input


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("leak", LEAKS)
@pytest.mark.parametrize("name", ["cross", "add", "token_window"])
def test_the_causality_tests_catch_a_one_concept_leak(monkeypatch: pytest.MonkeyPatch, name: str, leak: str,
                                                      mode: str) -> None:
    monkeypatch.setattr(ConceptGPT, "plan_of", LEAKS[leak])
    assert perturbation_leak(tiny(CONFIGS[name]), 30, mode) > 1e-4
    assert float(jacobian(tiny(CONFIGS[name]), 26, mode).triu(1).abs().max()) > 0


def test_a_token_window_is_a_band_that_concepts_reach_past() -> None:
    """A dense GPT with a 4-token window depends on exactly the last n_layer * 3 + 1 tokens;
    the concept model with the same token level also depends on tokens before that."""
    torch.manual_seed(0)
    dense = build_model(build_config("tiny", None, ["token_window=4"]).model)
    j = jacobian(dense, 26)
    reach = dense.config.n_layer * 3  # each layer looks 3 tokens further back
    t, s = torch.meshgrid(torch.arange(26), torch.arange(26), indexing="ij")
    assert float(j[(s < t - reach) | (s > t)].abs().max()) == 0.0
    assert bool((j[s == t - reach] > 0).all())
    far = jacobian(tiny(CONFIGS["token_window"]), 26)[s < t - reach]
    assert float(far.abs().max()) > 0  # the concept levels read the whole block


def test_a_token_window_decodes_with_a_cache_as_it_computes_in_full() -> None:
    torch.manual_seed(0)
    model = build_model(build_config("tiny", None, ["token_window=5"]).model).eval()
    x = torch.randint(0, 128, (2, 32))
    full = model(x, [0])[0]
    cache = model.new_cache(2)
    cuts = [0, 3, 4, 17, *range(18, 33)]  # chunks shorter and longer than the window, single tokens
    parts = [model(x[:, a:b], [0], cache)[0] for a, b in itertools.pairwise(cuts)]
    torch.testing.assert_close(torch.cat(parts, 2), full, rtol=1e-5, atol=1e-5)
    cache = model.new_cache(2)  # per-row positions (the server's batcher): the same band
    model(x[:, :20], [0], cache)
    cache[0].length = torch.tensor([20, 20])
    torch.testing.assert_close(model(x[:, 20:22], [0], cache)[0], full[:, :, 20:22], rtol=1e-5, atol=1e-5)
    with pytest.raises(FractalError, match="sliding window"):
        dense_model(model, None, None)


def canary_loss(tmp_path: Path, leak: bool, monkeypatch: pytest.MonkeyPatch, sets: list[str]
                ) -> tuple[float, int]:
    """Validation loss after training on uniform random characters, and the vocabulary."""
    gen = torch.Generator().manual_seed(5)
    alphabet = "abcdefghijklmnop"
    text = "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (40_000,), generator=gen).tolist())
    (tmp_path / "random.txt").write_text(text)
    if leak:
        monkeypatch.setattr(ConceptGPT, "plan_of", leaky_plan_of)
    cfg = build_config("tiny", None, ["family=concept", "tokenizer=char", f"vocab_size={len(alphabet)}",
                                      f"data={tmp_path / 'random.txt'}", "max_steps=150", "lr=0.01",
                                      "sample_tokens=0", "eval_every=150", "ckpt_every=150",
                                      "combiner=linear", "concept_read_init=1", *sets])
    res = train(cfg, tmp_path / ("leak" if leak else "run"), progress=False)
    return res.final[0].val_loss, len(alphabet)


@pytest.mark.parametrize("sets", [[], ["token_window=8"], ["concept_share=true"]])
@pytest.mark.slow
def test_leak_canary_random_tokens_stay_at_chance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  sets: list[str]) -> None:
    loss, vocab = canary_loss(tmp_path, False, monkeypatch, sets)
    assert loss >= math.log(vocab) - 0.05
    if not sets:  # the canary does sing on a leak (one configuration shows the harness has teeth)
        leaked, _ = canary_loss(tmp_path, True, monkeypatch, sets)
        assert leaked < math.log(vocab) - 0.2


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_generation_equals_full_recompute(name: str) -> None:
    model = tiny(CONFIGS[name]).eval()
    x = torch.randint(0, 128, (2, 32))
    full = model(x, [0])[0]
    cache = model.new_cache(2)
    cuts = [0, 5, 6, 7, 19, *range(20, 33)]  # a prompt, single tokens, a chunk crossing groups
    parts = [model(x[:, a:b], [0], cache)[0] for a, b in itertools.pairwise(cuts)]
    torch.testing.assert_close(torch.cat(parts, 2), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(x[:, :1], [0], cache)
    # the sampler, past the window (sliding): cached and uncached draw the same tokens
    prompt = x[0, :7].tolist()
    a = list(generate(model, prompt, 40, temperature=1.0, seed=3))
    b = list(generate(model, prompt, 40, temperature=1.0, seed=3, use_cache=False))
    assert a == b


def test_decoding_follows_writes_between_generations() -> None:
    """A generation keeps the level embedding rows, norm scales and scaled plans it made for
    itself only: after a write through ``p.data`` the next one decodes as a fresh copy does."""
    model = tiny(CONFIGS["three_levels_shared_add"]).eval()
    prompt = torch.randint(0, 128, (9,)).tolist()
    before = list(generate(model, prompt, 20, temperature=0))
    with torch.no_grad():
        for p in model.parameters():
            p.data.copy_(torch.randn_like(p) * 0.5)
    fresh = tiny(CONFIGS["three_levels_shared_add"]).eval()
    fresh.load_state_dict(model.state_dict())
    after = list(generate(model, prompt, 20, temperature=0))
    assert after == list(generate(fresh, prompt, 20, temperature=0))
    assert after != before  # the write did change what the model computes


@pytest.mark.parametrize("name", ["cross", "shared", "add"])
def test_growth_starts_as_a_no_op_and_then_learns(name: str) -> None:
    model = tiny(CONFIGS[name]).train()
    x, y = torch.randint(0, 128, (4, 32)), torch.randint(0, 128, (4, 32))
    logits = model(x)
    loss, sub = training_loss(model, logits, y)
    grown = grow(model, combo=2)
    assert grown.config.concept.levels == model.config.concept.levels + 1
    logits2 = grown(x)
    loss2, sub2 = training_loss(grown, logits2, y)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    assert torch.equal(sub2, sub)  # token cross-entropy unchanged at the step of growth
    assert float(loss2.detach()) >= float(loss.detach())  # plus the new level's regression term, nothing else
    loss2.backward()
    top = model.config.concept.levels
    assert float(grown.read_scale[top].grad.abs().sum()) > 0  # the new level's read can open


@pytest.mark.parametrize("name", ["cross", "add", "l1_no_loss_level"])
def test_a_new_model_starts_as_the_dense_gpt(name: str) -> None:
    """With the read gates closed (the default), the token level is the dense GPT at init:
    the same logits from the same weights (separate weights: a shared stack adds a level
    embedding to the tokens too). The tokens' gate gets a gradient, so training opens it."""
    torch.manual_seed(0)
    sets = ["family=concept", *CONFIGS[name]]
    model = build_model(build_config("tiny", None, sets).model).train()
    dense = build_model(build_config("tiny", None, ["n_layer=2"]).model)
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k in dense.state_dict()})
    x = torch.randint(0, 128, (2, 32))
    logits = model(x)
    loss, _ = training_loss(model, logits, x)
    torch.testing.assert_close(logits[0][0], dense(x)[0][0], rtol=0, atol=0)
    loss.backward()
    assert float(model.read_scale[0].grad.abs().sum()) > 0


@pytest.mark.parametrize("sets, message", [
    (["combo=1"], "each at least 2"),
    (["combo=4,4"], "one value, or 1"),
    (["combo=x"], "combo must be an integer"),
    (["concept_levels=3", "block_size=32"], "does not cover one top-level concept"),
    (["concept_loss=huber"], "concept_loss must be one of"),
    (["concept_weight=-1"], "concept_weight needs"),
    (["concept_read=sum"], "concept_read must be one of"),
    (["concept_share=true", "concept_layers=5"], "concept_share runs"),
    (["family=gpt", "combo=2"], "needs family=concept"),
    (["concept_read_init=nan"], "concept_read_init must be finite"),
    (["token_window=33"], "token_window must be between 0"),
    (["token_window=-1"], "token_window must be between 0"),
    (["token_window=4", "concept_share=true"], "token_window needs family gpt, or concept with separate"),
    (["family=fractal", "levels=2", "token_window=4"], "token_window needs family gpt"),
    (["levels=2"], "levels must be 1"),
    # variable chunks
    (["tokenizer=byte", "vocab_size=256", "chunking=learned"], "set concept_read=add"),
    (["chunking=space", "concept_read=add"], "chunking space reads UTF-8 bytes"),
    (["concept_encoder=1"], "concept_encoder needs a variable chunking"),
    (["chunking=learned", "concept_read=add", "concept_encoder=2"], "leaves no unit-level block"),
    (["chunking=learned", "concept_read=add", "chunk_size=0.5"], "chunk_size needs >= 1"),
    (["chunking=bpe"], "chunking must be one of"),
    (["concept_encoder=-2"], "concept_encoder needs -1"),
])
def test_bad_concept_configs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                sets: list[str], message: str) -> None:
    args = [a for s in sets for a in ("--set", s)]
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY_CONCEPT, *args, "--out", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_presets_build_with_the_seed_tokenizer_and_bytes() -> None:
    c = build_config("concept").model
    assert c.family == "concept" and c.vocab_size == 128 and c.concept.levels >= 1
    cb = build_config("concept-byte")
    assert cb.train.tokenizer == "byte" and cb.model.vocab_size == 256
    units = c.block_size * build_config("concept").train.batch_size
    assert cb.model.block_size * cb.train.batch_size == units  # a step reads as many units


@pytest.fixture(scope="module")
def concept_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("concept") / "run"
    from fractalformer.cli import main

    assert main(["train", *TINY_CONCEPT, "--set", "concept_levels=2", "--set", "combo=2",
                 "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_cli_train_eval_sample_analyze_load(concept_run: Path, excerpt: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    code, stdout, _ = run_cli(capsys, "eval", concept_run, "--json", "--data", excerpt, "--windows", "64")
    row = json.loads(stdout)[0]
    assert code == 0 and row["val_loss"] < math.log(128) and row["val_bpc"] > 0
    code, stdout, _ = run_cli(capsys, "sample", concept_run, "--max-new-tokens", "40", "--seed", "1",
                              "--prompt", "ROMEO:")
    assert code == 0 and stdout.startswith("ROMEO:") and len(stdout) > 20
    code, stdout2, _ = run_cli(capsys, "sample", concept_run, "--max-new-tokens", "40", "--seed", "1",
                               "--prompt", "ROMEO:", "--no-cache")
    assert stdout2 == stdout
    code, _, _ = run_cli(capsys, "analyze", concept_run, "--windows", "2", "--data", excerpt)
    assert code == 0 and (concept_run / "analysis" / "report.html").is_file()
    code, _, err = run_cli(capsys, "extract", concept_run, "--level", "0", "--index", "0",
                           "--out", tmp_path / "x")
    assert code == 2 and "not nested" in err
    code, _, err = run_cli(capsys, "export", concept_run, "--out", tmp_path / "hf")
    assert code == 2 and "family concept has no Llama equivalent" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()
    if importlib.util.find_spec("uvicorn"):
        code, _, err = run_cli(capsys, "serve", concept_run, "--port", "0")
        assert code == 2 and "cannot batch the concept family" in err
    with pytest.raises(FractalError, match="not a standalone model in family concept"):
        fractalformer.load(concept_run, level=0, index=0)
    trained = fractalformer.load(concept_run)
    model = trained.model
    assert isinstance(model, ConceptGPT) and not model.training
    idx = torch.tensor([trained.tokenizer.encode("ROMEO:")])
    logits = model(idx)[0][0]
    loss = family_loss(model, idx)  # an evaluating model leaves no training term
    assert logits.shape == (1, idx.shape[1], 128) and loss is None
    assert trained.generate("ROMEO:", 20, temperature=0, seed=1) == trained.generate(
        "ROMEO:", 20, temperature=0, seed=1, use_cache=False)


def test_byte_mode_reads_any_utf8(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "t.txt").write_text("Ünïcödé — 汉字 and emoji 🙂. " * 400, encoding="utf-8")
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", "--preset", "concept-byte", "--quiet", "--data",
                              tmp_path / "t.txt",
                              "--set", "n_layer=1", "--set", "d_model=32", "--set", "n_head=2",
                              "--set", "head_dim=16", "--set", "block_size=64", "--set", "batch_size=4",
                              "--set", "sample_tokens=20", "--max-steps", "3", "--out", out)
    assert code == 0 and "bits/byte" in stdout


@pytest.mark.parametrize("extra", [[], ["--set", "concept_share=true", "--set", "concept_read=add"]])
@pytest.mark.slow
def test_resume_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str]) -> None:
    assert_resume_is_exact(capsys, tmp_path, *TINY_CONCEPT, *extra, "--max-steps", "6",
                           "--set", "ckpt_every=3")


@pytest.mark.slow
@needs_torchrun
def test_torchrun_two_processes_match_single_process(tmp_path: Path) -> None:
    assert_two_processes_match_one(tmp_path, *TINY_CONCEPT, "--set", "concept_levels=2", "--set", "combo=2",
                                   "--max-steps", "3", rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_cli_grow_keeps_the_loss_and_trains_on(concept_run: Path, tiny_run: Path, excerpt: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "grown"
    code, stdout, _ = run_cli(capsys, "grow", concept_run, "--combo", "2", "--out", out)
    assert code == 0 and "3 concept levels" in stdout
    scored = ["--json", "--data", excerpt, "--windows", "64"]
    before = json.loads(run_cli(capsys, "eval", concept_run, *scored)[1])[0]
    after = json.loads(run_cli(capsys, "eval", out, *scored)[1])[0]
    assert after["val_loss"] == before["val_loss"] and after["params"] > before["params"]
    code, _, _ = run_cli(capsys, "train", "--out", out, "--resume", "--quiet", "--max-steps", "3")
    assert code == 0 and fractalformer.load(out).config.concept.levels == 3
    code, _, err = run_cli(capsys, "grow", concept_run, "--out", out)
    assert code == 2 and "already holds a run" in err
    # one grow command: --combo is for concept runs, --width / --depth for the others
    code, _, err = run_cli(capsys, "grow", tiny_run, "--combo", "2", "--out", tmp_path / "g2")
    assert code == 2 and "needs a family=concept run" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(capsys, "grow", tiny_run, "--out", tmp_path / "g2")
    assert code == 2 and "needs --width" in err and len(err.splitlines()) == 1
    for opt in (["--width", "2"], ["--depth", "2"]):
        code, _, err = run_cli(capsys, "grow", concept_run, *opt, "--out", tmp_path / "g2")
        assert code == 2 and "family concept run grows a concept level" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(capsys, "grow", concept_run, "--combo", "1", "--out", tmp_path / "g2")
    assert code == 2 and "--combo must be at least 2" in err
    assert not (tmp_path / "g2").exists()
    # --steps and --set as for width growth: the grown run trains on at once
    code, stdout, err = run_cli(capsys, "grow", concept_run, "--combo", "2", "--steps", "2",
                                "--set", "lr=1e-3", "--quiet", "--out", tmp_path / "g3")
    assert code == 0 and "3 concept levels" in stdout, err
    grown = fractalformer.load(tmp_path / "g3")
    assert grown.run_config.train.lr == 1e-3 and grown.run_config.train.max_steps == 2
