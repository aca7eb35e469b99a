"""FractalMoE: product-key retrieval, PEER / PKM read-outs, FHME halting, the moe family."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fractalformer.config import build_config
from fractalformer.models import build_model
from fractalformer.models import moe as moe_module
from fractalformer.models.moe import FHME, usage_summary
from fractalformer.nn.product_keys import PEER, PKM, ProductKeys, _Experts, _Read, experts
from fractalformer.train.losses import training_loss
from fractalformer.train.optim import make_optimizer

from .conftest import (
    assert_resume_is_exact,
    assert_two_processes_match_one,
    needs_torchrun,
    run_cli,
    torchrun,
)

TINY_MOE = ["--preset", "tiny", "--quiet", "--set", "family=moe", "--set", "moe=peer",
            "--set", "n_experts=256", "--set", "moe_heads=2", "--set", "moe_topk=4",
            "--set", "moe_key_dim=16", "--set", "sample_tokens=0"]


def tiny_model(moe: str, **kw: object) -> torch.nn.Module:
    sets = ["family=moe", f"moe={moe}", "n_experts=256", "moe_heads=2", "moe_topk=4", "moe_key_dim=16",
            *(f"{k}={v}" for k, v in kw.items())]
    torch.manual_seed(0)
    return build_model(build_config("tiny", None, sets).model)


@pytest.mark.parametrize("n_keys, topk", [(16, 1), (16, 4), (256, 3), (256, 16), (4096, 8), (4096, 64)])
def test_retrieval_equals_brute_force_top_k(n_keys: int, topk: int) -> None:
    torch.manual_seed(n_keys + topk)
    pk = ProductKeys(24, n_keys, heads=3, topk=topk, key_dim=16)
    x = torch.randn(50, 24)
    scores, idx = pk(x)
    q1, q2 = pk.queries(x).chunk(2, -1)  # brute force: every one of the N keys
    s1 = torch.einsum("thd,hnd->thn", q1, pk.sub_keys[0])
    s2 = torch.einsum("thd,hnd->thn", q2, pk.sub_keys[1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # key i * n + j
    ref_scores, ref_idx = full.topk(topk, -1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx, ref_idx)


def test_experts_read_out_equals_naive_sum_and_gradchecks() -> None:
    torch.manual_seed(1)
    t, m, d, n = 5, 6, 4, 20
    x = torch.randn(t, d, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, n, (t, m))
    idx[0, :2] = 3  # a row selected twice by one token
    g = torch.rand(t, m, dtype=torch.float64, requires_grad=True)
    up = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    down = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    out = _Experts.apply(x, idx, g, up, down, False)
    a = torch.nn.functional.gelu((up[idx] * x[:, None]).sum(-1), approximate="tanh")
    naive = ((g * a)[..., None] * down[idx]).sum(1)
    torch.testing.assert_close(out, naive)
    assert torch.autograd.gradcheck(lambda *z: _Experts.apply(z[0], idx, z[1], z[2], z[3], False),
                                    (x, g, up, down))
    table = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_Read.apply(idx, g, table, False), (g[..., None] * table[idx]).sum(1))
    assert torch.autograd.gradcheck(lambda gg, tt: _Read.apply(idx, gg, tt, False), (g, table))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_dot_equals_the_gathered_rows_dot_products(dtype: torch.dtype) -> None:
    """The sampled matrix product (float32 / 64) and the chunked gather (other dtypes)."""
    from fractalformer.nn.product_keys import gather_dot

    torch.manual_seed(0)
    table, x = torch.randn(50, 16, dtype=dtype), torch.randn(30, 16, dtype=dtype)
    idx = torch.randint(0, 50, (30, 7))
    idx[:, 1] = idx[:, 0]  # a row selected twice by one token
    want = (table[idx].float() * x[:, None].float()).sum(-1)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(gather_dot(table, idx, x).float(), want, rtol=tol, atol=tol)


def test_sparse_gradients_equal_dense_ones() -> None:
    torch.manual_seed(2)
    x = torch.randn(7, 8)
    grads = {}
    for sparse in (False, True):
        torch.manual_seed(3)
        layer = PEER(8, 64, heads=2, topk=3, key_dim=8, sparse=sparse)
        layer(x).pow(2).sum().backward()
        grads[sparse] = (layer.up.grad, layer.down.grad)
    assert grads[True][0].is_sparse and not grads[False][0].is_sparse
    for dense, sparse in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(sparse.to_dense(), dense)


@pytest.mark.parametrize("layer_cls", [PEER, PKM])
def test_gradients_reach_only_selected_rows_and_used_sub_keys(layer_cls: type) -> None:
    torch.manual_seed(4)
    layer = layer_cls(8, 256, 2, 3, 8)
    x = torch.randn(5, 8)
    _, idx = layer.keys(x)
    layer(x).pow(2).sum().backward()
    selected = set(idx.flatten().tolist())
    tables = [layer.up, layer.down] if layer_cls is PEER else [layer.values]
    for table in tables:
        touched = set(table.grad.abs().sum(1).nonzero().flatten().tolist())
        assert touched and touched <= selected
    n = layer.keys.n
    for half, used in enumerate((idx // n, idx % n)):
        for h in range(2):
            touched = set(layer.keys.sub_keys.grad[half, h].abs().sum(1).nonzero().flatten().tolist())
            assert touched and touched <= set(used[:, h].flatten().tolist())


COLLAPSE_FIXES = {"moe_shared": "true", "moe_gated": "true", "usage_weight": 0.1, "rekey_every": 2}


@pytest.mark.parametrize("moe, kw", [("peer", {}), ("pkm", {}), ("fhme", {}), ("peer", COLLAPSE_FIXES),
                                     ("pkm", COLLAPSE_FIXES)])
def test_causal_and_batch_independent_in_train_mode(moe: str, kw: dict) -> None:
    model = tiny_model(moe, **kw).train()
    x = torch.randint(0, 128, (3, 16))
    ref = model(x)[0][0]
    for t in (0, 7, 14):
        y = x.clone()
        y[:, t + 1] = (y[:, t + 1] + 1) % 128
        out = model(y)[0][0]
        torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1], ref[:, t + 1])
    alone = model(x[1:2])[0][0]  # a row's output does not depend on the other rows
    torch.testing.assert_close(alone, ref[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("moe", ["peer", "pkm", "fhme"])
def test_kv_cache_generation_equals_full_recompute(moe: str) -> None:
    model = tiny_model(moe).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)  # halting units and norms away from their start values
        x = torch.randint(0, 128, (2, 20))
        full = model(x)[0][0]
        cache = model.new_cache(2)
        steps = [model(x[:, :8], cache=cache)[0][0]] + [model(x[:, i : i + 1], cache=cache)[0][0]
                                                      for i in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def fhme_layer(bias: float, weight_std: float) -> FHME:
    model = tiny_model("fhme", fhme_depth=4, moe_layers="0")
    layer = model.sparse_layers()[0]
    with torch.no_grad():
        layer.halt.weight.normal_(0, weight_std)
        layer.halt.bias.fill_(bias)
    return layer


def test_halting_depth_depends_on_the_input_and_is_deterministic() -> None:
    layer = fhme_layer(0.0, 3.0).eval()
    x = torch.randn(64, 32)
    out = layer(x)
    depth = layer.last_depth.clone()
    assert depth.min() < depth.max()  # tokens differ in how deep they go
    assert torch.equal(layer(x), out) and torch.equal(layer.last_depth, depth)
    y = x.clone()
    y[0] = -y[0] * 3
    layer(y)
    assert torch.equal(layer.last_depth[1:], depth[1:])  # per token: the others keep their depth


def test_halted_tokens_skip_deeper_sub_blocks_and_are_counted() -> None:
    layer = fhme_layer(10.0, 0.0)  # p ~ 1: every token stops after sub-block 0
    layer.counts = [0, 0]
    layer(torch.randn(40, 32)).sum().backward()
    assert layer.counts == [40, 40] and torch.all(layer.last_depth == 1)
    assert all(p.grad is None or not p.grad.any() for p in [*layer.up, *layer.down])
    assert layer.router.up.grad.any()
    deep = fhme_layer(-10.0, 0.0)  # p ~ 0: every token runs all four
    deep.counts = [0, 0]
    deep(torch.randn(40, 32))
    # ponder cost (N + R) / depth with N = 4 sub-blocks and a remainder R ~ 1
    assert deep.counts == [40, 160] and math.isclose(float(deep.ponder.detach()), 1.25, abs_tol=1e-3)


def test_training_loss_adds_the_ponder_cost_in_training_only() -> None:
    """The trainer's objective: the sub-models' cross-entropy plus ``halt_penalty`` times the
    FHME layers' ponder cost of that very forward; an evaluating model adds nothing."""
    model = tiny_model("fhme", fhme_depth=4, moe_layers="0,1").train()
    x = torch.randint(0, 128, (2, 16))
    loss, sub = training_loss(model, model(x), x)
    ponders = torch.stack([m.ponder for m in model.sparse_layers().values()])
    penalty = model.config.moe.halt_penalty
    torch.testing.assert_close(loss, (model.weights * sub).sum() + penalty * ponders.mean())
    loss.backward()
    assert model.sparse_layers()[0].halt.weight.grad.abs().sum() > 0  # the halting units learn from it
    model.eval()
    with torch.no_grad():
        loss, sub = training_loss(model, model(x), x)
    torch.testing.assert_close(loss, (model.weights * sub).sum())


def test_compute_saved_counts_the_sub_blocks_that_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary's depth and saving against the rows every sub-block was actually applied to,
    counted where the sub-blocks run (not from the summary's own formula)."""
    depth, layers = 4, [0, 1]
    model = tiny_model("fhme", fhme_depth=depth, moe_layers="0,1").eval()
    with torch.no_grad():  # halting that stops some tokens early and lets others go deep
        for layer in model.sparse_layers().values():
            layer.halt.weight.normal_(0, 3.0)
            layer.halt.bias.zero_()
    applied: list[int] = []

    def counted(h: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        applied.append(h.shape[0])
        return experts(h, *args, **kwargs)

    monkeypatch.setattr(moe_module, "experts", counted)
    x = torch.randint(0, 128, (2, 24))
    with torch.no_grad(), model.track_usage() as usage:
        model(x, [0])
    summary, work = usage.summary(), len(layers) * x.numel() * depth
    assert len(layers) <= len(applied) <= len(layers) * depth and sum(applied) < work
    assert summary["compute_saved"] == pytest.approx(1 - sum(applied) / work)
    assert summary["mean_depth"] == pytest.approx(sum(applied) / (len(layers) * x.numel()))
    assert 0 < summary["compute_saved"] < 1 - 1 / depth


def test_act_weights_sum_to_one() -> None:
    layer = fhme_layer(-0.5, 1.0)
    x = torch.randn(30, 32)
    with torch.no_grad():
        for t in (*layer.down, layer.router.down):
            t.zero_()  # sub-blocks add nothing: h_d = x, so the output is (sum_d w_d - 1) x
    torch.testing.assert_close(layer(x), torch.zeros_like(x), rtol=0, atol=1e-6)


def test_usage_summary_on_synthetic_counts() -> None:
    n = 16
    even = usage_summary(torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.float64))
    assert even == {"expert_usage": 1.0, "expert_kl": pytest.approx(0.0), "dead_experts": 0.0}
    hits = torch.zeros(n, dtype=torch.long)
    hits[:4] = 5
    mass = torch.zeros(n, dtype=torch.float64)
    mass[:4] = 1.0
    s = usage_summary(hits, mass)
    assert s["expert_usage"] == 0.25 and s["dead_experts"] == 0.75
    assert s["expert_kl"] == pytest.approx(math.log(4))  # 4 of 16 experts, evenly: log(16/4)


def test_sparse_adam_leaves_unselected_rows_bit_identical() -> None:
    model = tiny_model("peer", moe_sparse=True, moe_layers="1")
    cfg = build_config("tiny", None, ["family=moe", "moe=peer", "moe_sparse=true"])
    opt = make_optimizer(model, cfg)
    layer = model.sparse_layers()[1]
    before = layer.down.detach().clone()
    x = torch.randint(0, 128, (2, 16))
    with layer_stats(layer) as hits:
        loss, _ = training_loss(model, model(x), x)
    loss.backward()
    assert layer.down.grad.is_sparse
    opt.step()
    used = hits > 0
    assert torch.equal(layer.down[~used], before[~used])
    assert not torch.equal(layer.down[used], before[used])


class layer_stats:
    def __init__(self, layer: PEER) -> None:
        from fractalformer.nn.product_keys import SparseStats

        self.layer, self.stats = layer, SparseStats(layer.up.shape[0], "cpu")

    def __enter__(self) -> torch.Tensor:
        self.layer.stats = self.stats
        return self.stats.hits

    def __exit__(self, *_: object) -> None:
        self.layer.stats = None


def test_usage_kl_is_zero_when_spread_and_positive_when_peaked() -> None:
    from fractalformer.nn.product_keys import usage_kl

    flat = torch.zeros(2, 5, 3, 16)  # (B, T, h, n): every sub-key equally likely
    assert float(usage_kl(flat)) == pytest.approx(0.0, abs=1e-7)
    peaked = flat.clone()
    peaked[..., 0] = 20.0  # every query of every row on sub-key 0
    assert float(usage_kl(peaked)) == pytest.approx(math.log(16), rel=1e-3)
    # per row: two rows that each spread over half the keys are judged row by row
    halves = torch.full((2, 4, 1, 16), -30.0)
    halves[0, ..., :8] = 0.0
    halves[1, ..., 8:] = 0.0
    assert float(usage_kl(halves)) == pytest.approx(math.log(2), rel=1e-4)


def test_training_loss_adds_the_usage_loss_and_it_reaches_the_keys() -> None:
    model = tiny_model("peer", usage_weight=0.5, moe_layers="0,1").train()
    x = torch.randint(0, 128, (2, 16))
    loss, sub = training_loss(model, model(x), x)
    balance = torch.stack([r.keys.balance for r in model.routers().values()])
    assert (balance > 0).all()
    torch.testing.assert_close(loss, (model.weights * sub).sum() + 0.5 * balance.mean())
    model.zero_grad()
    (0.5 * balance.mean()).backward()
    keys = model.routers()[0].keys
    assert keys.sub_keys.grad.abs().sum() > 0 and keys.query.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        loss, sub = training_loss(model, model(x), x)
    torch.testing.assert_close(loss, (model.weights * sub).sum())


def test_rekey_redraws_only_dead_sub_keys_next_to_used_ones() -> None:
    keys = ProductKeys(8, 256, heads=2, topk=2, key_dim=8, count=True).train()
    keys(torch.randn(3, 2, 8))  # 6 tokens x 2 experts: most of the 16 sub-keys per half go unused
    used = keys.used.clone()
    assert used.sum() == 2 * 2 * 6 * 2  # halves x heads x tokens x top-k
    before = keys.sub_keys.detach().clone()
    dead = keys.rekey(torch.Generator().manual_seed(0))
    assert torch.equal(dead, used == 0) and dead.any() and (~dead).any()
    after = keys.sub_keys.detach()
    assert torch.equal(after[~dead], before[~dead]) and not torch.equal(after[dead], before[dead])
    std = 1 / math.sqrt(4)
    for half in range(2):
        for h in range(2):
            live = before[half, h][~dead[half, h]]
            for row in after[half, h][dead[half, h]]:  # a copy of a used key, plus 0.1 x init noise
                assert (live - row).norm(dim=-1).min() < 0.1 * std * 6
    assert keys.used.sum() == 0
    keys.eval()
    keys(torch.randn(3, 2, 8))
    assert keys.used.sum() == 0  # only training selections count


def test_shared_tables_are_one_parameter_through_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture
                                                              ) -> None:
    import fractalformer

    alone, shared = tiny_model("peer"), tiny_model("peer", moe_shared="true")
    layers = list(shared.sparse_layers().values())
    assert all(m.up is layers[0].up and m.down is layers[0].down for m in layers)
    assert all(m.keys is not layers[0].keys for m in layers[1:])
    table = 2 * 256 * shared.config.d_model
    assert alone.num_params() - shared.num_params() == (len(layers) - 1) * table
    out = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY_MOE, "--set", "moe_shared=true", "--max-steps", "3",
                   "--out", out)[0] == 0
    model = fractalformer.load(out).model
    layers = list(model.sparse_layers().values())
    assert all(m.up is layers[0].up for m in layers)
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0][0], fractalformer.load(out).model(x)[0][0])


@pytest.mark.slow
def test_rekey_in_training_is_logged_and_resumes_exactly(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    args = [*TINY_MOE, "--set", "rekey_every=2", "--max-steps", "6", "--set", "ckpt_every=3"]
    assert_resume_is_exact(capsys, tmp_path, *args)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "rekey.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(0 <= v < 1 for r in rows for v in r["redrawn"].values())


@pytest.mark.parametrize("sparse", [False, True])
def test_rekey_restarts_the_moments_of_the_redrawn_sub_keys(sparse: bool, tmp_path: Path) -> None:
    """The callback on a live training state, with AdamW alone or the AdamW + SparseAdam pair."""
    from fractalformer.train.callbacks import Rekey
    from fractalformer.train.optim import param_state

    cfg = build_config("tiny", None, ["family=moe", "moe=peer", "n_experts=256", "moe_heads=2", "moe_topk=2",
                                      "moe_key_dim=16", "rekey_every=1", f"moe_sparse={str(sparse).lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    opt = make_optimizer(model, cfg)
    x = torch.randint(0, 128, (1, 6))
    training_loss(model, model(x), x)[0].backward()
    opt.step()
    keys = model.routers()[1].keys
    moments = [m for m in param_state(opt, keys.sub_keys).values() if m.shape == keys.sub_keys.shape]
    assert len(moments) == 2 and all(m.abs().sum() > 0 for m in moments)
    used = keys.used.clone()
    state = type("State", (), {"model": model, "optimizer": opt})()
    Rekey(cfg, main=True, out=tmp_path)(state, 1)
    dead = used == 0
    assert dead.any() and all((m[dead] == 0).all() and (m[~dead] != 0).any() for m in moments)
    assert (tmp_path / "rekey.jsonl").is_file()


def test_table_group_has_own_lr_and_no_decay() -> None:
    model = tiny_model("pkm")
    cfg = build_config("tiny", None, ["family=moe", "moe=pkm", "table_lr=0.01", "lr=0.002", "min_lr=0"])
    opt = make_optimizer(model, cfg)
    group = next(g for g in opt.param_groups if any(getattr(p, "table", False) for p in g["params"]))
    assert group["weight_decay"] == 0.0 and group["lr_scale"] == pytest.approx(5.0)
    assert {id(p) for p in group["params"]} == {id(m.values) for m in model.sparse_layers().values()}


@pytest.mark.parametrize("extra", [[], ["--set", "moe_sparse=true", "--set", "moe=fhme"]])
@pytest.mark.slow
def test_resume_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str]) -> None:
    assert_resume_is_exact(capsys, tmp_path, *TINY_MOE, *extra, "--max-steps", "6", "--set", "ckpt_every=3")


@pytest.fixture(scope="module")
def fhme_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "fhme"
    from fractalformer.cli import main

    assert main(["train", *TINY_MOE, "--set", "moe=fhme", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_cli_train_eval_sample_and_usage(fhme_run: Path, excerpt: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    out = fhme_run
    usage = json.loads((out / "expert_usage.json").read_text())
    assert 0 < usage["expert_usage"] <= 1 and 1 <= usage["mean_depth"] <= 3
    code, stdout, _ = run_cli(capsys, "eval", out, "--json", "--data", excerpt, "--windows", "64")
    row = json.loads(stdout)[0]
    for key in ("expert_usage", "expert_kl", "dead_experts", "mean_depth", "compute_saved"):
        assert key in row
    assert row["compute_saved"] == pytest.approx(1 - row["mean_depth"] / 3)
    code, stdout, _ = run_cli(capsys, "sample", out, "--max-new-tokens", "20", "--seed", "1")
    assert code == 0 and len(stdout) > 5
    code, _, err = run_cli(capsys, "extract", out, "--level", "0", "--index", "0", "--out", tmp_path / "x")
    assert code == 2 and "not nested" in err
    code, stdout, _ = run_cli(capsys, "eval", out, "--data", excerpt, "--windows", "64")
    assert code == 0 and "experts:" in stdout and "mean depth" in stdout


@pytest.mark.slow
def test_analyze_draws_the_expert_usage(fhme_run: Path, excerpt: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, _ = run_cli(capsys, "analyze", fhme_run, "--windows", "4", "--data", excerpt)
    assert code == 0
    page = (fhme_run / "analysis" / "report.html").read_text()
    assert "Experts (4 validation windows)" in page and (fhme_run / "analysis" / "expert_usage.png").is_file()
    summary = json.loads((fhme_run / "analysis" / "summary.json").read_text())
    assert 0 < summary["expert_usage"]["expert_usage"] <= 1


@pytest.mark.parametrize("sets, message", [
    (["n_experts=200"], "perfect square"),
    (["moe_topk=17"], "must not exceed sqrt"),
    (["moe_topk=0"], "moe_topk must be positive"),
    (["moe_gate=tanh"], "moe_gate must be one of"),
    (["moe_query_norm=batch"], "moe_query_norm must be one of"),
    (["moe_layers=7"], "moe_layers must name layers"),
    (["moe_layers=one"], "moe_layers must be"),
    (["moe=none"], "needs a sparse layer"),
    (["family=fractal", "levels=3", "moe=peer"], "cannot nest"),
    (["levels=2"], "levels must be 1"),
    (["moe=fhme", "moe_shared=true"], "apply to peer and pkm"),
    (["usage_weight=-1"], "usage_weight must not be negative"),
    (["rekey_every=-2"], "rekey_every must not be negative"),
    (["rekey_every=10", "parallel=fsdp"], "use parallel=ddp"),
])
def test_bad_moe_configs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            sets: list[str], message: str) -> None:
    args = [a for s in sets for a in ("--set", s)]
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY_MOE, "--set", "moe=peer", *args, "--out", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
@needs_torchrun
def test_torchrun_two_processes_match_single_process(tmp_path: Path) -> None:
    args = [*TINY_MOE, "--set", "moe=fhme", "--set", "batch_size=8", "--max-steps", "4"]
    assert_two_processes_match_one(tmp_path, *args, rtol=1e-3, atol=1e-4)
    proc = torchrun(*args, "--set", "moe_sparse=true", "--out", tmp_path / "sparse", ok=False)
    assert proc.returncode != 0 and "moe_sparse is single-process" in proc.stderr
    assert not (tmp_path / "sparse" / "config.json").exists()
