"""Mix'n'Match: a FractalFormer run at a level per layer (or per part) equals its dense extraction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fractalformer
from fractalformer import FractalError
from fractalformer.cli import main
from fractalformer.config import ModelConfig
from fractalformer.models import build_model
from fractalformer.serve.app import model_cards

from .conftest import run_cli

SHAPE = dict(family="fractal", levels=3, attn_nesting="heads", vocab_size=40, block_size=16, n_layer=3,
             d_model=32, n_head=4, n_kv_head=4, head_dim=8, mlp_mult=2.0)
MIXES = ["0,0,0", "0,1,2", "2,2,2", "1,2,0", "0:2,2:0,1:1"]


def make(dtype: torch.dtype = torch.float32, **over: object) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(ModelConfig.of(**{**SHAPE, **over})).to(dtype)
    with torch.no_grad():  # random norm scales: nothing hides behind zeros
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.1)
    return m.eval()


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-step tiny FractalFormer with whole-head nesting (2 layers: 9 mixes)."""
    out = tmp_path_factory.mktemp("mix") / "run"
    assert main(["train", "--preset", "tiny-fractal", "--quiet", "--set", "sample_tokens=0",
                 "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("spec", MIXES)
def test_mix_forward_matches_its_dense_extraction(spec: str) -> None:
    m = make()
    mix = m.parse_mix(spec)
    x = torch.randint(0, 40, (3, 16))
    with torch.no_grad():
        want = m.mix_forward(x, mix)[0][0]
        got = m.extract_mix(mix)(x)[0][0]
    assert (got - want).abs().max().item() <= 1e-5


def test_the_corner_mixes_are_the_full_model_and_the_level_sizes() -> None:
    m = make(torch.float64)
    x = torch.randint(0, 40, (2, 16))
    assert torch.equal(m.mix_forward(x, m.parse_mix("0,0,0"))[0], m(x, [0])[0])
    assert m.mix_params(m.parse_mix("0,0,0")) == m.num_params()
    for lv in (1, 2):  # every part at level l: the parameters of the level's sub-models together
        assert m.mix_params(m.parse_mix(",".join([str(lv)] * 3))) == m.nest.count(lv) * m.num_params(lv)
    assert m.mix_params(m.parse_mix("0,1,2")) < m.mix_params(m.parse_mix("0,0,1"))


def test_a_part_at_level_l_keeps_only_its_block_diagonal() -> None:
    m = make()
    dense = m.extract_mix(m.parse_mix("1:0,0,0"))  # attention at level 1, the MLP at level 0
    w, full = dense.blocks[0].attn.o.weight, m.blocks[0].attn.o.weight  # (d_model, heads * head_dim)
    h, d = w.shape[1] // 2, w.shape[0] // 2
    assert torch.equal(w[:d, :h], full[:d, :h]) and torch.equal(w[d:, h:], full[d:, h:])
    assert not w[:d, h:].any() and not w[d:, :h].any()
    assert torch.equal(dense.blocks[0].mlp.down.weight, m.blocks[0].mlp.down.weight)  # the MLP at level 0


@pytest.mark.parametrize("spec", ["0,1,2", "2:1,1:0,0:2"])
def test_a_mix_is_causal(spec: str) -> None:
    m = make()
    mix = m.parse_mix(spec)
    x = torch.randint(0, 40, (2, 16))
    base = m.mix_forward(x, mix)[0][0]
    for t in (0, 7, 14):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 1) % 40
        out = m.mix_forward(x2, mix)[0][0]
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), t
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize(("spec", "over", "message"), [
    ("0,1", {}, "one level per layer"),
    ("0,1,3", {}, "levels 0..2"),
    ("0,x,1", {}, "levels"),
    ("0,1:2:0,1", {}, "levels 0..2"),
    ("0,1,1", {"attn_nesting": "head_dim", "n_kv_head": 1, "n_head": 2, "head_dim": 16},
     "attn_nesting=heads"),
    ("0,0,0", {"residual": "upstream"}, "residuals"),
])
def test_a_bad_mix_is_one_clear_error(spec: str, over: dict, message: str) -> None:
    with pytest.raises(FractalError, match=message):
        make(**over).parse_mix(spec)


def test_head_dim_nesting_mixes_the_mlp_alone() -> None:
    m = make(attn_nesting="head_dim", n_kv_head=1, n_head=2, head_dim=16)
    mix = m.parse_mix("0:1,0:2,0")
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert (m.mix_forward(x, mix)[0][0] - m.extract_mix(mix)(x)[0][0]).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_mix_through_load_sample_eval_extract_and_serve(heads_run: Path, tmp_path: Path, capsys) -> None:
    full = fractalformer.load(heads_run).model
    mix = full.parse_mix("1,2")
    trained = fractalformer.load(heads_run, mix="1,2")
    assert trained.mix == mix and trained.mix_params == full.mix_params(mix)
    x = torch.randint(0, full.config.vocab_size, (2, full.config.block_size))
    with torch.no_grad():
        want = full.mix_forward(x, mix)[0][0]
        assert (trained.model(x)[0][0] - want).abs().max().item() <= 1e-5
    code, out, err = run_cli(capsys, "sample", heads_run, "--mix", "1,2", "--max-new-tokens", "8",
                             "--seed", "1")
    assert code == 0, err
    assert out.strip()
    code, out, err = run_cli(capsys, "eval", heads_run, "--mix", "1,2", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 1 and rows[0]["level"] == 0
    code, _, err = run_cli(capsys, "extract", heads_run, "--mix", "1,2", "--out", tmp_path / "mix")
    assert code == 0, err
    with torch.no_grad():
        assert (fractalformer.load(tmp_path / "mix").model(x)[0][0] - want).abs().max().item() <= 1e-5
    (card,) = model_cards(trained, heads_run)
    assert card["params"] == trained.mix_params and card["val_bpc"] is None  # never validated as a mix


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["sample", "{run}", "--mix", "1,2", "--level", "1"], "without --level"),
    (["extract", "{run}", "--mix", "1,2", "--level", "1", "--index", "0", "--out", "{tmp}/x"], "one mix"),
    (["extract", "{run}", "--out", "{tmp}/x"], "one mix"),
    (["eval", "{run}", "--mix", "1,2,0"], "one level per layer"),
    (["eval", "{dense}", "--mix", "0,0"], "family fractal"),
])
def test_mix_arguments_fail_in_one_line(heads_run: Path, tiny_run: Path, tmp_path: Path, capsys,
                                        args: list[str], message: str) -> None:
    args = [a.format(run=heads_run, dense=tiny_run, tmp=tmp_path) for a in args]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_analyze_scores_every_mix(heads_run: Path) -> None:
    from fractalformer.analysis.report import analyze

    report = analyze(heads_run, windows=2)
    summary = json.loads((report.parent / "summary.json").read_text())
    mixes = summary["mixes"]
    assert len(mixes["mixes"]) == 9 and len(mixes["trained"]) == 7
    params = {m["mix"]: m["params"] for m in mixes["mixes"]}
    assert params["0,0"] == max(params.values()) and params["2,2"] == min(params.values())
    front = [m for m in mixes["mixes"] if m["mix"] in mixes["front"]]
    assert front
    for f in front:  # no mix is as small and better
        assert not any(o["params"] <= f["params"] and o["bpc"] < f["bpc"] for o in mixes["mixes"]), f
    assert (report.parent / "mixes.png").stat().st_size > 0
    assert "Mix'n'Match" in report.read_text()


@pytest.mark.slow
def test_a_mix_exports_to_hugging_face(heads_run: Path, tmp_path: Path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    code, out, err = run_cli(capsys, "export", heads_run, "--mix", "2,1", "--out", tmp_path / "hf")
    assert code == 0, err
    assert "mix 2,1" in out
    full = fractalformer.load(heads_run).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, full.config.vocab_size, (3, full.config.block_size))
    with torch.no_grad():
        want = full.mix_forward(x, full.parse_mix("2,1"))[0][0]
        assert (hf(x).logits - want).abs().max().item() < 1e-4
