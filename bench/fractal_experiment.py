"""FractalFormer sub-models vs independently trained dense twins, at equal steps and tokens.

    python bench/fractal_experiment.py [--steps 500] [--out runs/experiment] [--only NAME ...]

Trains, on the shipped TinyShakespeare with the ``dense`` preset's dims and schedule
shape (batch 16 x 256, warmup, cosine), for the same number of steps:

* FractalFormer variants (levels 3, split 2): ``head_dim`` and ``heads`` attention
  nesting, ``upstream`` / ``downstream`` cross-level residuals, ``split`` data routing;
* one dense twin per sub-model shape (each sees the same batches as the full model).

Every run's full-split validation is stored in ``<out>/<name>/eval.json``; finished runs
are skipped when the script is re-run. Writes ``docs/fractal_experiment.md`` and
``docs/fractal_experiment.json`` with per-sub-model BPC, the twin's BPC, the gap, and the
wall time of each run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cached_result, finished, machine, timed_train, write_tables

from fractalformer.checkpoint import load_model_state
from fractalformer.config import build_config
from fractalformer.evaluate import evaluate_full
from fractalformer.models import build_model
from fractalformer.train.trainer import prepare_data

FF = ["family=fractal", "levels=3", "split=2"]
HEADS = ["attn_nesting=heads", "n_kv_head=4"]
VARIANTS: dict[str, list[str]] = {
    "ff_head_dim": FF,
    "ff_heads": FF + HEADS,
    "ff_upstream": [*FF, "residual=upstream"],
    "ff_downstream": [*FF, "residual=downstream"],
    "ff_split_routing": [*FF, "routing=split"],
    # issue 13 candidates: weights per level, in-place distillation from the full model
    "ff_heads_w211": FF + HEADS + ["level_weights=2,1,1"],
    "ff_heads_distill": FF + HEADS + ["distill=0.5"],
    "ff_heads_w211_distill": FF + HEADS + ["level_weights=2,1,1", "distill=0.5"],
    # the Matryoshka families against the same head_dim twins (prefix nesting, 1 sub-model per level)
    "matformer": ["family=matformer", "levels=3", "split=2"],
    "mrl": ["family=mrl", "levels=3", "split=2"],
}


def twin_sets(variant: list[str], level: int) -> list[str]:
    """The dense config with the shape of one sub-model of ``level`` of ``variant``."""
    model = build_model(build_config("dense", None, variant).model)
    c = model.sub_model_config(level)
    return [f"d_model={c.d_model}", f"n_head={c.n_head}", f"n_kv_head={c.n_kv_head}",
            f"head_dim={c.head_dim}"]


# Wall time of one all-levels ``heads`` step over one step of the full model alone
# (``python bench/bench_fractal.py``, docs/fractalformer.md): the full-width dense twin
# trained this many times the steps has the FractalFormer's training wall time.
EQUAL_WALL_RATIO = 2.37


def runs() -> dict[str, list[str]]:
    out = {}
    for mode, base in (("head_dim", FF), ("heads", FF + HEADS)):
        for lv in range(3):
            out[f"dense_{mode}_L{lv}"] = twin_sets(base, lv)
    out["dense_heads_L0_equal_wall"] = twin_sets(FF + HEADS, 0)
    return out | VARIANTS


def run_steps(name: str, steps: int) -> int:
    return round(steps * EQUAL_WALL_RATIO) if name.endswith("_equal_wall") else steps


def run_one(name: str, sets: list[str], steps: int, root: Path) -> dict:
    folder = root / name

    def compute() -> dict:
        cfg = build_config("dense", None, [*sets, f"max_steps={steps}", "sample_tokens=0"])
        _, wall = timed_train(cfg, folder)
        model = build_model(cfg.model)
        load_model_state(folder, model)
        _, corpus = prepare_data(cfg)
        rows = [r.to_json() for r in evaluate_full(model, corpus, cfg.model.block_size)]
        return {"name": name, "sets": sets, "steps": steps, "wall_s": wall, "rows": rows}

    return cached_result(folder, compute)


def report(results: dict[str, dict], steps: int) -> str:
    lines = [f"# FractalFormer vs independent dense twins ({steps} steps)", "",
             f"Machine: {machine()}.", "",
             f"Command: `python bench/fractal_experiment.py --steps {steps}`. Every run: shipped",
             "TinyShakespeare, bpe128, batch 16 x 256 tokens, AdamW 3e-3 -> 3e-4 cosine, the same",
             f"seed and batches; {steps} steps = {steps * 16 * 256:,} tokens per sub-model (except",
             "split routing, where a level-l sub-model sees 1/2^l of each batch). BPC = bits per",
             "character on the full validation split; gap = (sub-model - twin) / twin.", ""]
    for name in VARIANTS:
        if name not in results:
            continue
        r = results[name]
        mode = "heads" if "attn_nesting=heads" in r["sets"] else "head_dim"
        lines += [f"## {name} ({' '.join(r['sets'])}) - wall {r['wall_s'] / 60:.1f} min", "",
                  "| sub-model | width | params | val nats/token | BPC | twin BPC | gap |",
                  "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            twin = results.get(f"dense_{mode}_L{row['level']}")
            tb = twin["rows"][0]["val_bpc"] if twin else None
            gap = f"{(row['val_bpc'] - tb) / tb * 100:+.1f}%" if tb else "-"
            lines.append(f"| ({row['level']}, {row['index']}) | {row['width']} | {row['params']:,} | "
                         f"{row['val_loss']:.4f} | {row['val_bpc']:.4f} | "
                         f"{f'{tb:.4f}' if tb else '-'} | {gap} |")
        lines.append("")
    lines += ["## Dense twins", "", "| twin | config | params | val nats/token | BPC | wall |",
              "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name.startswith("dense_") and not name.endswith("_equal_wall"):
            row = r["rows"][0]
            lines.append(f"| {name} | {' '.join(r['sets'])} | {row['params']:,} | {row['val_loss']:.4f} | "
                         f"{row['val_bpc']:.4f} | {r['wall_s'] / 60:.1f} min |")
    eq = results.get("dense_heads_L0_equal_wall")
    if eq:
        bpc = eq["rows"][0]["val_bpc"]
        lines += ["", "## Equal wall time", "",
                  f"One all-levels `heads` step costs {EQUAL_WALL_RATIO}x a step of the full model alone "
                  f"(`bench/bench_fractal.py`), so the full-width dense twin given the FractalFormer's "
                  f"training time runs {eq['steps']} steps (its own cosine schedule): "
                  f"**{bpc:.4f} bits/char**.", "",
                  "| FractalFormer variant | full model BPC | vs dense twin at equal wall time |",
                  "|---|---|---|"]
        for name, r in results.items():
            if name.startswith("ff_heads"):
                full = r["rows"][0]["val_bpc"]
                lines.append(f"| {name} | {full:.4f} | {(full - bpc) / bpc * 100:+.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--only", nargs="*", help="run only these names")
    ap.add_argument("--docs", default="docs")
    a = ap.parse_args()
    root = Path(a.out) / f"steps{a.steps}"
    results = {}
    for name, sets in runs().items():
        if a.only and name not in a.only:
            results |= finished(root, [name])
            continue
        print(f"== {name}: {' '.join(sets)}", flush=True)
        results[name] = run_one(name, sets, run_steps(name, a.steps), root)
        print(f"   {results[name]['wall_s']:.0f} s; full-model BPC {results[name]['rows'][0]['val_bpc']:.4f}",
              flush=True)
        write_tables(Path(a.docs) / "fractal_experiment", results, report(results, a.steps))


if __name__ == "__main__":
    main()
