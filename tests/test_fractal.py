from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fractalformer
from fractalformer import FractalError
from fractalformer.config import ModelConfig, build_config
from fractalformer.models import GPT, build_model
from fractalformer.train.losses import training_loss

from .conftest import run_cli

BASE = dict(vocab_size=40, block_size=16, n_layer=2, d_model=32, n_head=2, n_kv_head=1, head_dim=16,
            mlp_mult=2.0)
FAMILIES = {
    "fractal": dict(family="fractal", levels=3),
    "fractal_heads": dict(family="fractal", levels=3, attn_nesting="heads", n_head=4, n_kv_head=4,
                          head_dim=8),
    "fractal_split3": dict(family="fractal", levels=2, split=3, d_model=36, head_dim=12, mlp_mult=4.0),
    "upstream": dict(family="fractal", levels=3, residual="upstream"),
    "upstream_lowrank": dict(family="fractal", levels=3, residual="upstream", residual_rank=3),
    "downstream": dict(family="fractal", levels=3, residual="downstream", residual_rank=2),
    "matformer": dict(family="matformer", levels=3),
    "mrl": dict(family="mrl", levels=3),
}


def make(name: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = build_model(ModelConfig.of(**{**BASE, **FAMILIES[name]}))
    with torch.no_grad():  # random norm scales, biases and low-rank maps: nothing hides behind zeros
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias") or "lora" in n:
                p.normal_(0, 0.1)
    return m.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_causality_of_every_sub_model(name: str) -> None:
    m = make(name)
    x = torch.randint(0, 40, (2, 16))
    base = m(x, m.body_levels())
    for t in (0, 7, 14):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 1) % 40
        out = m(x2, m.body_levels())
        for lv in base:
            assert torch.equal(out[lv][:, :, : t + 1], base[lv][:, :, : t + 1]), (lv, t)
            assert not torch.allclose(out[lv][:, :, t + 1], base[lv][:, :, t + 1])


@pytest.mark.parametrize("name", ["fractal", "fractal_heads", "fractal_split3", "matformer", "upstream"])
def test_extraction_parity(name: str) -> None:
    m = make(name)
    x = torch.randint(0, 40, (3, 16))
    for lv in range(m.nest.levels):
        if not m.extractable(lv):
            with pytest.raises(FractalError, match="not extractable"):
                m.extract(lv, 0)
            continue
        ref = m(x, m.needed_levels(lv))[lv]
        for j in range(m.nest.count(lv)):
            sub = m.extract(lv, j)
            assert type(sub) is GPT and sub.config.nesting.levels == 1
            assert sub.num_params() == m.num_params(lv)
            assert sub.num_params() < m.num_params() or lv == 0
            torch.testing.assert_close(sub(x)[0][0], ref[j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fractal", "matformer", "mrl"])
def test_parameter_count_is_what_a_sub_model_reads(name: str) -> None:
    """The parameter entries sub-model (lv, 0)'s logits depend on (nonzero gradient, with every
    token in the input) are as many as the tables list for it: an MRL size reads the whole
    body but not the final norm's scale past its width."""
    m = make(name)
    torch.manual_seed(1)
    x = torch.cat([torch.randperm(40), torch.randint(0, 40, (8,))]).view(3, 16)  # every token id
    counts = []
    for lv in range(m.nest.levels):
        m.zero_grad(set_to_none=True)
        m(x, m.needed_levels(lv))[lv][0].pow(2).sum().backward()
        used = sum(int((p.grad != 0).sum()) for p in m.parameters() if p.grad is not None)
        assert used == m.num_params(lv), lv
        counts.append(used)
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts)


def test_extractable_levels_under_residuals() -> None:
    assert [make("upstream").extractable(lv) for lv in range(3)] == [False, False, True]
    assert [make("downstream").extractable(lv) for lv in range(3)] == [True, False, False]
    assert [make("mrl").extractable(lv) for lv in range(3)] == [True, False, False]


@pytest.mark.parametrize("name", ["fractal", "fractal_split3", "downstream", "matformer", "mrl"])
def test_training_loss_is_the_weighted_sum_and_every_sub_model_gets_gradient(name: str) -> None:
    m = make(name).train()
    x, y = torch.randint(0, 40, (4, 16)), torch.randint(0, 40, (4, 16))
    loss, sub = training_loss(m, m(x), y)
    subs = m.config.sub_models()
    assert len(sub) == len(subs) and (m.weights > 0).all()
    torch.testing.assert_close(loss.detach(), (m.weights * sub).sum())
    logits = m(x, m.body_levels())
    for k, (lv, j) in enumerate(subs):
        own = F.cross_entropy(logits[lv][j].flatten(0, 1), y.flatten())
        torch.testing.assert_close(own.detach(), sub[k])
        params = [(mod, n, p) for mod in m.modules() if hasattr(mod, "nest_dims")
                  for n, p in mod.named_parameters(recurse=False)]
        grads = torch.autograd.grad(own, [p for *_, p in params], retain_graph=True, allow_unused=True)
        for (mod, n, _p), g in zip(params, grads, strict=True):
            if m.body_levels() == [0] and n != "weight":
                continue
            assert g is not None, (lv, j, n)
            owned = m.nest.take(g, lv, mod.nest_dims[n])[j]
            assert owned.abs().sum() > 0, (lv, j, n)


@pytest.mark.parametrize("name", ["fractal", "upstream", "downstream", "mrl"])
def test_train_mode_and_cached_inference_compute_the_same_function(name: str) -> None:
    m = make(name)
    x = torch.randint(0, 40, (2, 16))
    m.train()
    trained = m(x, m.body_levels())
    m.eval()
    caches = m.new_cache(2)
    steps = [m(x[:, a:b], m.body_levels(), caches) for a, b in ((0, 5), (5, 6), (6, 16))]
    for lv in trained:
        torch.testing.assert_close(torch.cat([s[lv] for s in steps], 2), trained[lv], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sets,match",
    [
        (["family=fractal", "levels=3", "d_model=102"], "d_model (102) is not divisible by"),
        (["family=fractal", "levels=4", "head_dim=8"], "head_dim 8 is too small"),
        (["family=fractal", "levels=3", "attn_nesting=heads"], "n_kv_head (1) divisible by"),
        (["levels=3"], "family gpt is dense"),
        (["family=fractal", "levels=1"], "needs levels >= 2"),
        (["family=matformer", "levels=3", "residual=upstream"], "need family=fractal"),
        (["family=fractal", "levels=3", "residual=upstream", "routing=split"], "cannot combine"),
        (["family=fractal", "levels=3", "level_weights=1,2"], "level_weights needs 3"),
        (["family=fractal", "levels=3", "split=1"], "split must be at least 2"),
        (["routing=shard"], "needs a nested model"),
        (["family=fractal", "levels=3", "distill=1.5"], "distill must lie in [0, 1]"),
        (["family=mrl", "levels=3", "distill=0.5"], "not family mrl"),
        (["family=fractal", "levels=3", "distill=0.5", "routing=split"], "cannot combine with distill"),
    ],
)
def test_bad_nesting_configs(sets: list[str], match: str) -> None:
    with pytest.raises(FractalError, match=re.escape(match)):
        build_config("dense", None, sets)


def test_level_weights() -> None:
    cfg = build_config("dense", None, ["family=fractal", "levels=3"]).model
    assert cfg.sub_model_weights() == [1 / 7] * 7
    cfg.nesting.level_weights = [2.0, 1.0, 1.0]
    w = cfg.sub_model_weights()
    assert w[0] == pytest.approx(0.5) and w[1] == pytest.approx(0.125) and w[3] == pytest.approx(0.0625)


@pytest.mark.parametrize("name", ["fractal", "matformer"])
def test_distillation_pulls_sub_models_towards_the_full_model(name: str) -> None:
    m = make(name).train()
    m.config.nesting.distill = 0.25
    x, y = torch.randint(0, 40, (4, 16)), torch.randint(0, 40, (4, 16))
    loss, sub = training_loss(m, m(x), y)
    logits = m(x, m.body_levels())
    teacher = F.log_softmax(logits[0][0], -1)
    terms = []
    for k, (lv, j) in enumerate(m.config.sub_models()):
        own = F.cross_entropy(logits[lv][j].flatten(0, 1), y.flatten())
        torch.testing.assert_close(own.detach(), sub[k])  # the reported losses stay plain cross-entropy
        kl = F.kl_div(F.log_softmax(logits[lv][j], -1), teacher, log_target=True, reduction="none").sum(-1)
        terms.append(own if lv == 0 else 0.75 * own + 0.25 * kl.mean())
    torch.testing.assert_close(loss, (m.weights * torch.stack(terms)).sum())
    # the teacher is detached: without the full model's own loss, weights only it owns get no gradient
    m.config.nesting.level_weights = [0.0, 1.0, 1.0]
    m.weights = torch.tensor(m.config.sub_model_weights())
    w, dims = m.blocks[0].mlp.down.weight, m.blocks[0].mlp.down.nest_dims["weight"]
    owned = torch.autograd.grad(m.nest.take(w, 1, dims).sum(), w)[0] != 0
    grad = torch.autograd.grad(training_loss(m, m(x), y)[0], w)[0]
    assert grad[owned].abs().sum() > 0 and not owned.all() and grad[~owned].abs().sum() == 0


@pytest.mark.slow
def test_every_sub_model_learns(fractal_run: Path) -> None:
    import csv

    with (fractal_run / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["val_loss"]]
    first, last = rows[0], rows[-1]
    for k in ["0.0", "1.0", "1.1", "2.0", "2.1", "2.2", "2.3"]:
        assert float(last[f"val_{k}"]) < float(first[f"val_{k}"]) - 0.05, k
    assert (fractal_run / "curves.png").is_file()


@pytest.mark.slow
def test_fractal_cli_eval_sample_extract(capsys, fractal_run: Path, excerpt: Path, tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "eval", fractal_run, "--json", "--data", excerpt, "--windows", "64")
    rows = json.loads(out)
    assert code == 0
    assert [(r["level"], r["index"]) for r in rows] == [
        (0, 0), (1, 0), (1, 1), (1, "ensemble"), (2, 0), (2, 1), (2, 2), (2, 3), (2, "ensemble")]
    assert {"level", "index", "width", "params", "val_loss", "val_bpc"} <= rows[0].keys()
    assert [r["width"] for r in rows] == [32, 16, 16, 16, 8, 8, 8, 8, 8]

    for args in (["--level", "2", "--index", "3"], ["--level", "1", "--ensemble"]):
        code, out, _ = run_cli(capsys, "sample", fractal_run, "--prompt", "KING:", "--max-new-tokens", "10",
                               "--seed", "0", *args)
        assert code == 0 and out.startswith("KING:") and len(out) > 6
    for args, match in ((["--level", "3"], "level 3 is out of range"),
                        (["--level", "1", "--index", "2"], "index 2 is out of range"),
                        (["--level", "-1"], "level -1 is out of range")):
        code, _, err = run_cli(capsys, "sample", fractal_run, *args)
        assert code == 2 and err.strip().splitlines() == [f"error: {err.strip()[7:]}"] and match in err

    sub_dir = tmp_path / "sub"
    code, out, _ = run_cli(capsys, "extract", fractal_run, "--level", "2", "--index", "1", "--out", sub_dir)
    assert code == 0
    sub = fractalformer.load(sub_dir).model
    assert sub.config.family == "gpt" and sub.config.d_model == 8
    full = fractalformer.load(fractal_run).model
    x = torch.randint(0, 128, (2, 32))
    torch.testing.assert_close(sub(x)[0][0], full(x, [2])[2][1], rtol=1e-5, atol=1e-5)
    code, out, _ = run_cli(capsys, "eval", sub_dir, "--json", "--data", excerpt, "--windows", "64")
    in_fractal = next(r for r in rows if (r["level"], r["index"]) == (2, 1))
    assert json.loads(out)[0]["val_loss"] == pytest.approx(in_fractal["val_loss"], abs=1e-5)
    # an extracted run trains further
    code, _, err = run_cli(capsys, "train", "--out", sub_dir, "--resume", "--max-steps", "5", "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "extract", fractal_run, "--level", "2", "--index", "4", "--out",
                           tmp_path / "bad")
    assert code == 2 and "index 4 is out of range" in err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("sets", [
    ["family=matformer", "levels=3"],
    ["family=mrl", "levels=3"],
    ["family=fractal", "levels=3", "routing=split"],
    ["family=fractal", "levels=3", "routing=shard"],
    ["family=fractal", "levels=3", "residual=upstream", "residual_rank=2"],
    ["family=fractal", "levels=3", "distill=0.5", "dtype=bfloat16"],  # bf16 autocast on the CPU too
])
@pytest.mark.slow
def test_every_family_trains_from_the_cli(capsys, tmp_path: Path, sets: list[str]) -> None:
    args = [a for s in sets for a in ("--set", s)]
    code, out, err = run_cli(capsys, "train", "--preset", "tiny", *args, "--set",
                             "sample_tokens=5", "--max-steps", "4", "--out", tmp_path / "r")
    assert code == 0, err
    assert "validation of every sub-model" in out and "sample from sub-model (2, 0)" in out


@pytest.mark.slow
def test_fractal_resume_gives_the_uninterrupted_losses(capsys, tmp_path: Path) -> None:
    common = ["--preset", "tiny-fractal", "--quiet", "--set", "sample_tokens=0", "--max-steps", "6"]
    assert run_cli(capsys, "train", *common, "--out", tmp_path / "a")[0] == 0
    assert run_cli(capsys, "train", *common, "--out", tmp_path / "b", "--stop-after", "3")[0] == 0
    assert run_cli(capsys, "train", "--out", tmp_path / "b", "--resume", "--quiet")[0] == 0
    def rows(run: str) -> list[list[str]]:  # every column but elapsed_s (the 7th)
        lines = (tmp_path / run / "metrics.csv").read_text().splitlines()
        return [[c for i, c in enumerate(line.split(",")) if i != 6] for line in lines]

    assert len(rows("a")) == 7 and rows("a") == rows("b")
