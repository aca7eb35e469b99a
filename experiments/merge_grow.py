"""Merged-then-glued and grown FractalFormers vs one trained from scratch, by FLOPs.

    OMP_NUM_THREADS=1 python -m experiments.merge_grow [--steps 800] [--glue 100]
        [--out runs/bench_merge] [--set lr=1e-3 --tag _lr1e-3 --only merged]  # a merged / grown variant

A small shape (so that it finishes on a shared 2-core CPU): the parent is a FractalFormer
of d_model 128, 2 layers, levels 2 (split 2, ``heads`` attention nesting: 4 query / 2 KV
heads of 32), context 128, batch 16, shipped TinyShakespeare (bpe128). Runs, one at a time:

* ``scratch``: the parent from scratch, ``--steps`` S steps;
* ``child0``, ``child1``: dense GPTs of the parent's level-1 shape (d_model 64), S/2 steps
  each, child ``j`` on data shard ``j/2`` of the training tokens;
* ``merged``: ``merge child0 child1`` - ``--glue`` steps of glue only (children frozen),
  then full training; parent steps chosen so that children + parent = the scratch FLOPs;
* ``original``: a dense d_model-64 GPT on all the data, S/2 steps;
* ``grown``: ``grow original --width 2``, trained so that original + grown = scratch FLOPs.

FLOPs per training token of a dense model: ``6 * P + 6 * L * T * q_width`` (P = weights of
every matmul, the tied output head included, embedding lookup excluded; the attention
term is QK^T and AV over an average context of T/2, forward + backward = 3x forward). A
FractalFormer step runs every sub-model on every token: the sum over its sub-models. A glue
step costs a full parent step (the frozen blocks' gradients are computed, then masked).

Every run's validation curve uses the same fixed validation batches (the runs share the
seed); "reaches" = the first evaluation at or below scratch's final value. Writes
``docs/results/merge_grow.md`` and ``docs/results/merge_grow.json``; finished runs are reused.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import fractalformer
from fractalformer.config import ModelConfig, build_config
from fractalformer.growth import grow_run, merge_runs
from fractalformer.models import build_model
from fractalformer.train import train
from harness import machine, script_parser

COMMON = ["block_size=128", "batch_size=16", "n_layer=2", "head_dim=32", "lr=3e-3", "min_lr=3e-4",
          "warmup_steps=50", "eval_every=25", "eval_batches=8", "ckpt_every=100000", "sample_tokens=0"]
PARENT = ["family=fractal", "levels=2", "split=2", "attn_nesting=heads", "d_model=128", "n_head=4",
          "n_kv_head=2"]
CHILD = ["d_model=64", "n_head=2", "n_kv_head=1"]


def token_flops(c: ModelConfig) -> float:
    """Training FLOPs per token of one dense model of config ``c``."""
    q, kv, h = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.mlp_hidden
    per_layer = c.d_model * (q + 2 * kv) + q * c.d_model + c.d_model * 2 * h + h * c.d_model
    return 6 * (c.n_layer * per_layer + c.vocab_size * c.d_model) + 6 * c.n_layer * c.block_size * q


def step_flops(sets: list[str]) -> float:
    """Training FLOPs of one step: every sub-model on every token of the batch."""
    cfg = build_config("dense", None, COMMON + sets)
    model = build_model(cfg.model)
    tokens = cfg.train.batch_size * cfg.model.block_size
    return tokens * sum(token_flops(model.sub_model_config(lv)) * model.nest.count(lv)
                        for lv in range(model.nest.levels))


def curve(run: Path) -> list[tuple[int, float]]:
    """(step, validation bits/char of the full model) at every evaluation."""
    with (run / "metrics.csv").open(newline="") as f:
        return [(int(r["step"]), float(r["val_bpc"])) for r in csv.DictReader(f) if r["val_bpc"]]


def done(run: Path, steps: int) -> bool:
    return (run / "metrics.csv").is_file() and any(s == steps for s, _ in curve(run))


def train_run(out: Path, sets: list[str], steps: int) -> None:
    if done(out, steps):
        return
    cfg = build_config("dense", None, COMMON + sets + [f"max_steps={steps}"])
    train(cfg, out, progress=False)


def reach(points: list[tuple[int, float]], target: float, offset: int = 0) -> int | None:
    """The first step (plus ``offset``) whose value is at or below ``target``."""
    return next((s + offset for s, v in points if v <= target), None)


def at_merge(out: Path) -> dict[str, float]:
    """Validation bits/char of every sub-model of the merged model before any glue training."""
    from fractalformer.evaluate import fixed_val_batches, mean_losses, to_bpc
    from fractalformer.growth import merge_models
    from fractalformer.runs import prepare_data

    kids = [fractalformer.load(out / f"child{j}") for j in range(2)]
    t = kids[0].run_config.train
    _, corpus = prepare_data(kids[0].run_config, kids[0].tokenizer)
    batches = fixed_val_batches(corpus, t.eval_batches, t.batch_size, kids[0].config.block_size, t.seed)
    losses, _ = mean_losses(merge_models([k.model for k in kids]).eval(), batches)
    return {f"{lv}.{j}": to_bpc(v, corpus.val_units_per_token) for (lv, j), v in losses.items()}


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--steps", type=int, default=800, help="scratch parent steps S")
    ap.add_argument("--glue", type=int, default=100, help="glue-only steps of the merged run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="training-key override for the merged and grown runs (e.g. lr=1e-3)")
    ap.add_argument("--tag", default="", help="suffix of the merged / grown run folders and the doc file")
    ap.add_argument("--only", choices=("merged", "grown"), help="run one of the two comparisons")
    ap.add_argument("--out", default="runs/bench_merge")
    ap.add_argument("--doc", default="docs/results/merge_grow")
    a = ap.parse_args()
    out = Path(a.out)
    s_half = a.steps // 2
    f_parent, f_child = step_flops(PARENT), step_flops(CHILD)
    budget = a.steps * f_parent
    merged_steps = round((budget - 2 * s_half * f_child) / f_parent)
    grown_steps = round((budget - s_half * f_child) / f_parent)
    m_dir, g_dir = out / f"merged{a.tag}", out / f"grown{a.tag}"

    train_run(out / "scratch", PARENT, a.steps)
    scratch = curve(out / "scratch")
    target = scratch[-1][1]
    result: dict = {
        "machine": machine(),
        "command": " ".join(["python -m experiments.merge_grow", *sys.argv[1:]]),
        "flops_per_step": {"parent": f_parent, "child": f_child},
        "scratch": {"steps": a.steps, "flops": budget, "final_bpc": target, "curve": scratch},
    }
    if a.only != "grown":
        for j in range(2):
            train_run(out / f"child{j}", [*CHILD, f"data_shard={j}/2", f"seed={1337 + j}"], s_half)
        if not done(m_dir, merged_steps):
            merge_runs([out / "child0", out / "child1"], m_dir, a.glue, merged_steps - a.glue,
                       routing="shared", sets=a.set, progress=False)
        merged = curve(m_dir)
        m_reach = reach(merged, target)
        result["children"] = {"steps_each": s_half, "flops": 2 * s_half * f_child,
                              "final_bpc": [curve(out / f"child{j}")[-1][1] for j in range(2)]}
        result["merged"] = {
            "sets": a.set, "glue_steps": a.glue, "full_steps": merged_steps - a.glue,
            "parent_flops": merged_steps * f_parent,
            "total_flops": merged_steps * f_parent + 2 * s_half * f_child,
            "at_merge_bpc": at_merge(out), "final_bpc": merged[-1][1], "reach_step": m_reach,
            "reach_parent_flops_fraction": m_reach / a.steps if m_reach else None, "curve": merged}
    if a.only != "merged":
        train_run(out / "original", CHILD, s_half)
        if not (g_dir / "provenance.json").is_file():
            grow_run(out / "original", g_dir, 2, 1, grown_steps, sets=a.set, progress=False)
        grown = curve(g_dir)
        g_reach = reach(grown, target)
        grow_info = json.loads((g_dir / "provenance.json").read_text())
        result["original"] = {"steps": s_half, "flops": s_half * f_child,
                              "final_bpc": curve(out / "original")[-1][1]}
        result["grown"] = {
            "sets": a.set, "steps": grown_steps, "total_flops": grown_steps * f_parent + s_half * f_child,
            "final_bpc": grown[-1][1], "reach_step": g_reach,
            "reach_step_fraction": g_reach / a.steps if g_reach else None,
            "at_growth": {k: v for k, v in grow_info.items() if k.endswith(("loss", "bpc"))}, "curve": grown}
    result["final_evals"] = {name: [r.to_json() for r in _final(path)] for name, path in
                             (("scratch", out / "scratch"), ("merged", m_dir), ("grown", g_dir))
                             if name in result}
    Path(a.doc + a.tag + ".json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "curve"} if isinstance(v, dict) else v
                      for k, v in result.items() if k != "final_evals"}, indent=1))


def _final(run: Path) -> list:
    from fractalformer.evaluate import evaluate_full
    from fractalformer.runs import prepare_data

    trained = fractalformer.load(run)
    _, corpus = prepare_data(trained.run_config, trained.tokenizer)
    return evaluate_full(trained.model, corpus, trained.config.block_size)


if __name__ == "__main__":
    main()
