"""FractalFormer sub-models vs independently trained dense twins, at equal steps and wall time.

    python -m experiments.fractal_experiment [--steps 500] [--out runs/experiment] [--only NAME ...]

Trains, on the shipped TinyShakespeare with the ``dense`` preset's dims and schedule
shape (batch 16 x 256, warmup, cosine), for the same number of steps:

* FractalFormer variants (levels 3, split 2): ``head_dim`` and ``heads`` attention
  nesting, ``upstream`` / ``downstream`` cross-level residuals, ``split`` data routing,
  weights per level and in-place distillation, and the Matryoshka families;
* one dense twin per sub-model shape (each sees the same batches as the full model);
* for every ``heads`` variant, the full-width dense twin at equal wall time: the variant's
  seconds per training step (its whole training run's wall time, periodic evaluations
  included, over its steps) against the full-width twin's (``dense_heads_L0``), both
  measured by this script, give the ratio, and the twin trains ``steps x ratio`` steps on
  its own schedule (twins of equal step counts are shared; ``--only
  dense_heads_L0_equal_wall`` trains them).
  The ratio is only as good as the two wall times: run them on the same, otherwise idle
  machine.

Every run's full-split validation and wall time are stored in ``<out>/<name>/eval.json``;
finished runs are skipped when the script is re-run (``--report`` only rebuilds the
tables). Writes ``docs/results/fractal_experiment.md`` and ``.json`` with per-sub-model
BPC, the twin's BPC, the gap, the wall time of each run and the equal-wall-time table.
"""

from __future__ import annotations

import json
from pathlib import Path

from fractalformer.checkpoint import load_model_state
from fractalformer.config import build_config
from fractalformer.evaluate import evaluate_full
from fractalformer.models import build_model
from fractalformer.runs import prepare_data
from harness import cached_result, experiment_parser, finished, machine, timed_train, write_tables

FF = ["family=fractal", "levels=3", "split=2"]
HEADS = ["attn_nesting=heads", "n_kv_head=4"]
VARIANTS: dict[str, list[str]] = {
    "ff_head_dim": FF,
    "ff_heads": FF + HEADS,
    "ff_upstream": [*FF, "residual=upstream"],
    "ff_downstream": [*FF, "residual=downstream"],
    "ff_split_routing": [*FF, "routing=split"],
    # weights per level, in-place distillation from the full model
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


EQUAL_WALL = "dense_heads_L0_equal_wall"  # the --only name of the equal-wall-time twins


def runs() -> dict[str, list[str]]:
    out = {}
    for mode, base in (("head_dim", FF), ("heads", FF + HEADS)):
        for lv in range(3):
            out[f"dense_{mode}_L{lv}"] = twin_sets(base, lv)
    return out | VARIANTS


def wall_ratio(variant: dict, full: dict) -> float:
    """Seconds per training step (training wall time over steps) of ``variant`` over those
    of the full-width dense twin."""
    return (variant["wall_s"] / variant["steps"]) / (full["wall_s"] / full["steps"])


def equal_wall_twins(results: dict[str, dict]) -> dict[str, int]:
    """For every finished ``heads`` variant: the steps of the full-width dense twin that
    take the variant's training wall time, from both runs' measured seconds per step."""
    full = results.get("dense_heads_L0")
    if full is None:
        return {}
    return {name: round(full["steps"] * wall_ratio(r, full)) for name, r in results.items()
            if name.startswith("ff_heads")}


def run_one(name: str, sets: list[str], steps: int, root: Path, folder: Path | None = None) -> dict:
    folder = folder or root / name

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
             f"Command: `python -m experiments.fractal_experiment --steps {steps}`. Every run: shipped",
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
        if name.startswith("dense_") and not name.startswith(EQUAL_WALL):
            row = r["rows"][0]
            lines.append(f"| {name} | {' '.join(r['sets'])} | {row['params']:,} | {row['val_loss']:.4f} | "
                         f"{row['val_bpc']:.4f} | {r['wall_s'] / 60:.1f} min |")
    full = results.get("dense_heads_L0")
    twins = {n: results[f"{EQUAL_WALL}_{n}"] for n in equal_wall_twins(results)
             if f"{EQUAL_WALL}_{n}" in results}
    if full and twins:
        lines += ["", "## Equal wall time", "",
                  "Each `heads` variant's training seconds per step over those of the full-width dense "
                  f"twin `dense_heads_L0` ({full['wall_s'] / full['steps']:.3f} s/step), both measured in "
                  "this run, is the ratio; the full-width dense twin given the variant's training time "
                  f"runs {steps} x ratio steps (its own cosine schedule).", "",
                  "| FractalFormer variant | full model BPC | s/step | ratio | twin steps | twin BPC "
                  "| vs dense twin at equal wall time |",
                  "|---|---|---|---|---|---|---|"]
        for name, eq in twins.items():
            r = results[name]
            full_bpc, bpc = r["rows"][0]["val_bpc"], eq["rows"][0]["val_bpc"]
            lines.append(f"| {name} | {full_bpc:.4f} | {r['wall_s'] / r['steps']:.3f} | "
                         f"{wall_ratio(r, full):.2f}x | {eq['steps']} | {bpc:.4f} | "
                         f"{(full_bpc - bpc) / bpc * 100:+.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    names = list(runs())
    ap = experiment_parser(__doc__, 500, "runs/experiment", [*names, EQUAL_WALL])
    a = ap.parse_args()
    root = Path(a.out) / f"steps{a.steps}"
    results = finished(root, names)
    stem = Path(a.docs) / "fractal_experiment"

    def train_one(name: str, sets: list[str], steps: int, folder: Path | None = None) -> dict:
        print(f"== {name}: {' '.join(sets)} ({steps} steps)", flush=True)
        r = run_one(name, sets, steps, root, folder)
        print(f"   {r['wall_s']:.0f} s; full-model BPC {r['rows'][0]['val_bpc']:.4f}", flush=True)
        return r

    for name, sets in ([] if a.report else runs().items()):
        if not a.only or name in a.only:
            results[name] = train_one(name, sets, a.steps)
            write_tables(stem, results, report(results, a.steps))
    # the equal-wall-time twins, from the wall times just measured (or stored by an earlier run)
    full_sets = twin_sets(FF + HEADS, 0)
    for variant, steps in equal_wall_twins(results).items():
        folder = root / f"{EQUAL_WALL}_steps{steps}"
        name = f"{EQUAL_WALL}_{variant}"
        if a.report or (a.only and EQUAL_WALL not in a.only):
            if (folder / "eval.json").is_file():
                results[name] = json.loads((folder / "eval.json").read_text())
            continue
        results[name] = train_one(name, full_sets, steps, folder)
        write_tables(stem, results, report(results, a.steps))
    write_tables(stem, results, report(results, a.steps))


if __name__ == "__main__":
    main()
