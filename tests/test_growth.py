"""Model fusion and growth: merge, frozen glue training, folding, growth invariance, the CLI."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fractalformer
from fractalformer import FractalError
from fractalformer import checkpoint as ckpt
from fractalformer.config import ModelConfig, RunConfig, build_config
from fractalformer.data.corpus import read_text
from fractalformer.data.tokenizers import get_tokenizer
from fractalformer.growth import grow_model, merge_models
from fractalformer.models import GPT, build_model
from fractalformer.models.fractal import fold_glue
from fractalformer.runs import load_run_config, save_run_config
from fractalformer.train import make_optimizer
from fractalformer.train.losses import training_loss
from fractalformer.train.optim import frozen_masks, lr_at

from .conftest import run_cli

BASE = dict(vocab_size=40, block_size=16, n_layer=2, d_model=16, n_head=2, n_kv_head=1, head_dim=8,
            mlp_mult=2.0)


def dense(seed: int, **kw: object) -> GPT:
    """A dense GPT with random norm scales and biases (nothing hides behind zeros)."""
    torch.manual_seed(seed)
    m = build_model(ModelConfig.of(**{**BASE, **kw}))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_(0, 0.1)
    return m.eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def random_glue(m: GPT) -> GPT:
    """Non-zero off-diagonal blocks (and low-rank glue maps), as after glue training."""
    with torch.no_grad():
        for p, frozen in frozen_masks(m):
            p[~frozen] = torch.randn(int((~frozen).sum())) * 0.05
        if m.glue is not None:
            for g in m.glue.values():
                g.up.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("attn_nesting", ["heads", "head_dim"])
def test_children_extract_bit_identical_and_run_unchanged(attn_nesting: str) -> None:
    kids = [dense(1), dense(2)]
    m = random_glue(merge_models(kids, attn_nesting)).eval()
    assert m.config.d_model == 32 and m.config.nesting.levels == 2
    assert m.config.nesting.attn_nesting == attn_nesting
    x = torch.randint(0, 40, (2, 16))
    level1 = m(x, [1])[1]
    for j, kid in enumerate(kids):
        assert same_weights(m.extract(1, j), kid)
        assert torch.equal(level1[j], kid(x)[0]) or torch.allclose(level1[j], kid(x)[0], atol=1e-6)
    assert not torch.allclose(m(x)[0][0], level1[0], atol=1e-3)  # the full model is more than a child


def test_merge_again_quarters_to_halves_to_one() -> None:
    quarters = [dense(s) for s in range(4)]
    halves = [merge_models(quarters[:2]), merge_models(quarters[2:])]
    whole = merge_models([random_glue(h) for h in halves])
    assert (whole.config.nesting.levels, whole.config.d_model, whole.config.n_head) == (3, 64, 8)
    for j, q in enumerate(quarters):
        assert same_weights(whole.extract(2, j), q)
    for j, h in enumerate(halves):
        assert same_weights(whole.extract(1, j), h.extract(0, 0))


def test_merged_model_is_causal_and_cache_consistent() -> None:
    m = random_glue(merge_models([dense(1), dense(2)], glue_rank=2)).eval()
    x = torch.randint(0, 40, (2, 16))
    full = m(x, m.body_levels())
    for t in (0, 7, 14):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 1) % 40
        out = m(x2, m.body_levels())
        for lv in full:
            assert torch.equal(out[lv][:, :, : t + 1], full[lv][:, :, : t + 1]), (lv, t)
            assert not torch.allclose(out[lv][:, :, t + 1], full[lv][:, :, t + 1])
    caches = m.new_cache(2)
    steps = [m(x[:, a:b], m.body_levels(), caches) for a, b in ((0, 5), (5, 6), (6, 16))]
    for lv in full:
        torch.testing.assert_close(torch.cat([s[lv] for s in steps], 2), full[lv], rtol=1e-5, atol=1e-5)


def test_full_model_of_a_glued_model_keeps_its_glue(tmp_path: Path) -> None:
    """Extracting or loading level 0 of a model still training its low-rank glue folds the glue in
    (an export of a run cut off mid-glue computes what the run does)."""
    m = random_glue(merge_models([dense(1), dense(2)], glue_rank=2)).eval()
    x = torch.randint(0, 40, (2, 16))
    torch.testing.assert_close(m.extract(0, 0)(x)[0][0], m(x)[0][0], rtol=1e-4, atol=1e-5)
    cfg = build_config("tiny-fractal", None, ["levels=2", "glue_rank=2"])
    tok = get_tokenizer(cfg.train.tokenizer, read_text(cfg.train.data))
    cfg.model.vocab_size = tok.vocab_size
    glued = random_glue(build_model(cfg.model)).eval()
    save_run_config(tmp_path, cfg, tok)
    ckpt.save_tensors(tmp_path / ckpt.MODEL, dict(glued.state_dict()))  # weights alone
    x = torch.randint(0, tok.vocab_size, (2, 16))
    loaded = fractalformer.load(tmp_path, level=0, index=0).model
    torch.testing.assert_close(loaded(x)[0], glued(x)[0], rtol=1e-4, atol=1e-5)


def test_merge_rejects_mismatched_runs() -> None:
    with pytest.raises(FractalError, match="vocab_size"):
        merge_models([dense(1), dense(2, vocab_size=41)])
    with pytest.raises(FractalError, match="depth"):
        merge_models([dense(1), dense(2, n_layer=3)])
    with pytest.raises(FractalError, match="d_model"):
        merge_models([dense(1), dense(2, d_model=32)])
    with pytest.raises(FractalError, match="at least 2"):
        merge_models([dense(1)])
    fractal = build_model(ModelConfig.of(**{**BASE, "family": "fractal", "levels": 2, "d_model": 32,
                                         "head_dim": 16, "residual": "upstream"}))
    with pytest.raises(FractalError, match="cross-level residuals"):
        merge_models([fractal, fractal])


def _glue_steps(m: GPT, frozen_optimizer: bool, steps: int = 3) -> None:
    cfg = RunConfig(m.config, dataclasses.replace(RunConfig().train, lr=0.05, weight_decay=0.5,
                                                  freeze="children" if frozen_optimizer else "none"))
    cfg.validate()
    opt = make_optimizer(m, cfg)
    if not frozen_optimizer:  # gradient masks alone, as a plain optimizer would see them
        for p, frozen in frozen_masks(m):
            keep = (~frozen).float()
            p.register_hook(lambda g, keep=keep: g * keep)
    m.train()
    x = torch.randint(0, 40, (4, 16))
    for _ in range(steps):
        loss, _ = training_loss(m, m(x), torch.roll(x, -1, 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("glue_rank", [0, 2])
def test_frozen_children_stay_bit_identical_through_adamw(glue_rank: int) -> None:
    kids = [dense(1), dense(2)]
    m = merge_models(kids, glue_rank=glue_rank)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    _glue_steps(m, frozen_optimizer=True)
    for j, kid in enumerate(kids):
        assert same_weights(m.extract(1, j), kid)
    masks = {id(p): frozen for p, frozen in frozen_masks(m)}
    changed = 0
    for n, p in m.named_parameters():
        frozen = masks.get(id(p), torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p[frozen], before[n][frozen]), n
        changed += int(not torch.equal(p[~frozen], before[n][~frozen]))
    assert changed >= (6 if glue_rank else 4)  # the glue did train (maps, or off-diagonal blocks)
    # gradient masks alone are not enough: AdamW's weight decay shrinks the frozen entries
    if not glue_rank:
        plain = merge_models(kids)
        _glue_steps(plain, frozen_optimizer=False)
        assert not same_weights(plain.extract(1, 0), kids[0])


@pytest.mark.parametrize("attn_nesting", ["heads", "head_dim"])
def test_folded_glue_computes_the_same_function(attn_nesting: str) -> None:
    kids = [dense(1), dense(2)]
    m = random_glue(merge_models(kids, attn_nesting, glue_rank=3)).eval()
    folded = fold_glue(m).eval()
    assert folded.config.nesting.glue_rank == 0 and folded.glue is None
    assert folded.num_params() < m.num_params()
    x = torch.randint(0, 40, (3, 16))
    ref, out = m(x, m.body_levels()), folded(x, folded.body_levels())
    assert (ref[0] - out[0]).abs().max() < 1e-5
    assert (ref[0] - merge_models(kids, attn_nesting)(x)[0]).abs().max() > 1e-3  # the glue mattered
    for j, kid in enumerate(kids):
        assert same_weights(folded.extract(1, j), kid)


@torch.no_grad()
def _loss(m: GPT, x: torch.Tensor) -> float:
    logits = m(x)[0][0]
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()))


@pytest.mark.parametrize("width,depth,fractal", [(2, 1, False), (3, 2, False), (2, 1, True), (2, 2, True)])
def test_growth_preserves_the_function_and_nests_the_original(width: int, depth: int, fractal: bool) -> None:
    orig = dense(1, n_kv_head=2)
    if fractal:
        orig = random_glue(merge_models([dense(1, n_kv_head=2), dense(2, n_kv_head=2)])).eval()
    grown = grow_model(orig, width, depth).eval()
    c = grown.config
    o = orig.config
    assert (c.nesting.levels, c.d_model) == (o.nesting.levels + 1, o.d_model * width)
    assert c.n_layer == o.n_layer * depth
    x = torch.randint(0, 40, (4, 16))
    assert abs(_loss(grown, x) - _loss(orig, x)) < 1e-4
    torch.testing.assert_close(grown(x)[0][0], orig(x)[0][0], rtol=1e-4, atol=1e-5)
    if depth == 1:  # the original is sub-model (1, 0), weight for weight
        assert same_weights(grown.extract(1, 0), orig.extract(0, 0) if fractal else orig)
        if fractal:
            assert same_weights(grown.extract(2, 1), orig.extract(1, 1))
    else:  # inserted layers are identities: sub-model (1, 0) still computes the original
        torch.testing.assert_close(grown(x, [1])[1][0], orig(x)[0][0], rtol=1e-4, atol=1e-5)


def test_grow_rejects_what_it_cannot_preserve() -> None:
    head_dim = merge_models([dense(1), dense(2)], "head_dim")
    with pytest.raises(FractalError, match="attn_nesting=heads"):
        grow_model(head_dim, 2)
    with pytest.raises(FractalError, match="split 2"):
        grow_model(merge_models([dense(1), dense(2)]), 3)
    with pytest.raises(FractalError, match="width >= 2"):
        grow_model(dense(1), 1)


def test_schedule_start_and_data_shard_config() -> None:
    cfg = build_config("tiny", None, ["max_steps=40", "warmup_steps=5"])
    shifted = build_config("tiny", None, ["max_steps=60", "warmup_steps=5", "schedule_start=20"])
    assert [lr_at(s, cfg) for s in range(40)] == [lr_at(s + 20, shifted) for s in range(40)]
    assert build_config("tiny", None, ["data_shard=1/2"]).train.shard() == (1, 2)
    for bad, match in (("data_shard=2/2", "data_shard"), ("data_shard=x", "data_shard"),
                       ("schedule_start=20", "schedule_start"), ("freeze=children", "freeze=children")):
        with pytest.raises(FractalError, match=match):
            build_config("tiny", None, [bad])


# -- the command line ----------------------------------------------------------------------------
def make_run(path: Path, seed: int, *sets: str) -> Path:
    """An untrained run folder (fast): random weights with random norms and biases."""
    cfg = build_config("tiny", None, ["sample_tokens=0", "eval_batches=1", *sets])
    tok = get_tokenizer(cfg.train.tokenizer, read_text(cfg.train.data))
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(seed)
    m = build_model(cfg.model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_(0, 0.1)
    save_run_config(path, cfg, tok)
    ckpt.save_checkpoint(path, dict(m.state_dict()), make_optimizer(m, cfg), {"step": 0, "elapsed_s": 0.0})
    return path


@pytest.mark.slow
def test_merge_cli_errors_are_one_line_and_write_nothing(capsys, tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", 1)
    b = make_run(tmp_path / "b", 2)
    data = tmp_path / "chars.txt"
    data.write_text("".join(chr(c) for c in range(192, 192 + 128)) * 20, encoding="utf-8")
    other_tok = make_run(tmp_path / "c", 3, "tokenizer=char", f"data={data}")
    char = make_run(tmp_path / "d", 4, "tokenizer=char")
    deeper = make_run(tmp_path / "e", 5, "n_layer=3")
    wider = make_run(tmp_path / "f", 6, "d_model=64")
    cases = [([a], "at least 2"), ([a, char], "vocab_size"), ([a, other_tok], "another tokenizer"),
             ([a, deeper], "depth"), ([a, wider], "d_model"), ([a, tmp_path / "nope"], "not found")]
    cases.append(([a, b, "--set", "d_model=64"], "training keys only"))
    for runs, match in cases:
        code, _, err = run_cli(capsys, "merge", *runs, "--out", tmp_path / "m", "--quiet")
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, (match, err)
        assert not (tmp_path / "m").exists()
    assert run_cli(capsys, "merge", a, b, "--out", tmp_path / "m")[0] == 0
    code, _, err = run_cli(capsys, "merge", a, b, "--out", tmp_path / "m")
    assert code == 2 and "already holds a run" in err


@pytest.mark.slow
def test_merge_cli_glue_then_full_on_shards(capsys, tmp_path: Path, excerpt: Path) -> None:
    kids = [make_run(tmp_path / f"k{j}", j, f"data_shard={j}/2", f"data={excerpt}") for j in range(2)]
    out = tmp_path / "m"
    code, stdout, err = run_cli(capsys, "merge", *kids, "--out", out, "--train-glue-steps", "4",
                                "--then-steps", "3", "--glue-rank", "2", "--set", "lr=0.002", "--quiet")
    assert code == 0, err
    assert "merged 2 runs" in stdout
    cfg, _ = load_run_config(out)
    assert (cfg.model.nesting.glue_rank, cfg.train.freeze, cfg.train.routing) == (0, "none", "shard")
    assert (cfg.train.schedule_start, cfg.train.max_steps, cfg.train.lr) == (4, 7, 0.002)
    lines = (out / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in lines[1:]] == list(range(1, 8))
    assert run_cli(capsys, "eval", out)[0] == 0
    glue_only = tmp_path / "g"
    assert run_cli(capsys, "merge", *kids, "--out", glue_only, "--train-glue-steps", "3", "--glue-rank", "2",
                   "--quiet")[0] == 0
    merged = fractalformer.load(glue_only)
    assert (merged.config.nesting.glue_rank, merged.run_config.train.freeze) == (0, "children")  # folded
    for j, kid in enumerate(kids):  # the children come back out bit-identical
        x = tmp_path / f"x{j}"
        assert run_cli(capsys, "extract", glue_only, "--level", "1", "--index", j, "--out", x)[0] == 0
        assert same_weights(fractalformer.load(x).model, fractalformer.load(kid).model)
    glue = [p[~frozen] for p, frozen in frozen_masks(merged.model) if p.dim() == 2 and (~frozen).any()]
    assert len(glue) == 8 and all(g.abs().sum() > 0 for g in glue)  # the folded glue trained


@pytest.mark.slow
def test_grow_cli_invariance_then_training(capsys, tmp_path: Path, excerpt: Path) -> None:
    run = make_run(tmp_path / "r", 1, f"data={excerpt}")
    code, stdout, err = run_cli(capsys, "grow", run, "--width", "2", "--depth", "2", "--out", tmp_path / "g",
                                "--quiet")
    assert code == 0, err
    diff = float(stdout.rsplit("difference ", 1)[1])
    assert diff < 1e-4 and math.isfinite(diff)
    assert fractalformer.load(tmp_path / "g").config.n_layer == 4
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "g", "--resume", "--max-steps", "3",
                           "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "grow", run, "--width", "1", "--out", tmp_path / "h")
    assert code == 2 and "width >= 2" in err and not (tmp_path / "h").exists()


@pytest.mark.slow
def test_merge_cli_again_quarters_to_one(capsys, tmp_path: Path) -> None:
    quarters = [make_run(tmp_path / f"q{j}", j, "d_model=16", "n_head=2", "n_kv_head=1") for j in range(4)]
    for h in range(2):
        assert run_cli(capsys, "merge", *quarters[2 * h:2 * h + 2], "--out", tmp_path / f"h{h}")[0] == 0
    assert run_cli(capsys, "merge", tmp_path / "h0", tmp_path / "h1", "--out", tmp_path / "one")[0] == 0
    one = fractalformer.load(tmp_path / "one").model
    assert (one.config.nesting.levels, one.config.d_model) == (3, 64)
    for j, q in enumerate(quarters):
        assert same_weights(one.extract(2, j), fractalformer.load(q).model)
