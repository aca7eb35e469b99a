"""FractalFormer training recipes against dense twins, at equal steps and at equal FLOPs.

    python -m experiments.recipes [--steps 700] [--out runs/recipes] [--only NAME ...]

Every run is the default preset's model and schedule (``fractalformer train``: 3 levels,
split 2, ``heads`` nesting, batch 16 x 256, the same seed and batches) with one recipe of
which sub-models train each step and how their gradients combine (``sampling``,
``level_probs``, ``level_grads``, ``level_weights``, ``distill``, ``mix_weight``). Twins: one dense GPT per
sub-model shape (``experiments.fractal_experiment``'s ``dense_heads_L*``), same steps.

**Equal FLOPs.** The training FLOPs of a step (forward + backward, counted by
``torch.utils.flop_counter`` on the model at batch 16 x 256) are summed over the run's
actual sample of levels (and, with ``mix_weight``, its Mix'n'Match models); the seven
twins a FractalFormer replaces (1 full, 2 half, 4 quarter) together cost the sum of theirs
a step. At equal FLOPs each twin trains
``recipe FLOPs / twin-set FLOPs per step`` steps (its own schedule; rounded to 10).

Writes ``docs/results/recipes.md`` / ``.json`` and ``docs/fractal_recipes.png`` (bits/char
against parameters: every sub-model of every recipe, the twins' curves).
"""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.fractal_experiment import run_one, twin_sets
from fractalformer.config import build_config
from fractalformer.models import build_model
from fractalformer.models.fractal import Mix
from fractalformer.train.losses import mix_loss, step_mix, step_weights, training_loss
from harness import experiment_parser, finished, machine, write_tables

DEFAULT = ["family=fractal", "levels=3", "split=2", "attn_nesting=heads", "n_kv_head=4"]
RECIPES: dict[str, list[str]] = {
    # every sub-model every step, half the loss on the full model (the preset before this study)
    "all_w211": ["level_weights=2,1,1"],
    # MatFormer: one level per step, uniform; and tuned towards the full model
    "level_uniform": ["sampling=level"],
    "level_tuned": ["sampling=level", "level_probs=2,1,1"],
    # slimmable networks: full + smallest + one random, in-place distillation
    "sandwich_distill": ["sampling=sandwich", "distill=0.5"],
    # gradient surgery between the levels
    "all_w211_pcgrad": ["level_weights=2,1,1", "level_grads=pcgrad"],
    # every step also a random Mix'n'Match model (a level per layer), a quarter of the loss
    "all_w211_mix": ["level_weights=2,1,1", "mix_weight=0.25"],
}
TWINS = {lv: f"dense_heads_L{lv}" for lv in range(3)}


@functools.cache
def level_flops(sets: tuple[str, ...]) -> tuple[int, ...]:
    """Training FLOPs (forward + backward) of one step of each level alone, at the preset's batch."""
    cfg = build_config("dense", None, list(sets))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    x = torch.randint(cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.block_size))
    out = []
    for lv in range(model.nest.levels):
        with FlopCounterMode(display=False) as fc:
            training_loss(model, model(x, [lv]), x)[0].backward()
        out.append(fc.get_total_flops())
        model.zero_grad(set_to_none=True)
    return tuple(out)


@functools.cache
def mix_flops(mix: Mix) -> int:
    """Training FLOPs (forward + backward) of one step of a Mix'n'Match model of the default."""
    cfg = build_config("dense", None, DEFAULT)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    x = torch.randint(cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.block_size))
    with FlopCounterMode(display=False) as fc:
        mix_loss(model.mix_forward(x, mix), x).backward()
    return fc.get_total_flops()


def recipe_flops(sets: list[str], steps: int) -> int:
    """Training FLOPs of the whole run: every step's sampled levels (and its mix)."""
    cfg = build_config("dense", None, [*sets, f"max_steps={steps}"])
    per = level_flops(tuple(DEFAULT))
    model = build_model(cfg.model) if cfg.train.mix_weight else None
    total = 0
    for step in range(steps):
        levels, _ = step_weights(cfg, step)
        total += sum(per[lv] for lv in (levels if levels is not None else range(len(per))))
        if model is not None:
            total += mix_flops(step_mix(model, cfg, step))
    return total


def twin_set_flops() -> int:
    """One step of the seven twins a FractalFormer replaces (1 full, 2 half, 4 quarter)."""
    return sum((2**lv) * level_flops(tuple(twin_sets(DEFAULT, lv)))[0] for lv in range(3))


def equal_flops_steps(sets: list[str], steps: int) -> int:
    return max(10, round(recipe_flops(sets, steps) / twin_set_flops() / 10) * 10)


def twin_name(lv: int, steps: int, base: int) -> str:
    return TWINS[lv] if steps == base else f"{TWINS[lv]}_steps{steps}"


def level_table(r: dict, twins: dict[int, float]) -> list[str]:
    """One line of per-level figures: every sub-model's gap to its twin."""
    cells = []
    for lv in range(3):
        gaps = [(row["val_bpc"] - twins[lv]) / twins[lv] * 100 for row in r["rows"]
                if row["level"] == lv and row["index"] != "ensemble"]
        cells.append(f"{gaps[0]:+.1f}%" if len(gaps) == 1 else f"{min(gaps):+.1f}% .. {max(gaps):+.1f}%")
    return cells


def report(results: dict[str, dict], steps: int) -> str:
    twin_set = twin_set_flops()
    lines = [f"# FractalFormer training recipes vs dense twins ({steps} steps)", "",
             f"Machine: {machine()}.", "",
             f"Command: `python -m experiments.recipes --steps {steps}`. The default preset's model, data,",
             "batch 16 x 256 and schedule; one recipe per row. BPC = bits per character on the full",
             "validation split; gap = (sub-model - twin) / twin. FLOPs: forward + backward of the",
             "run's sampled levels (`torch.utils.flop_counter`); the seven twins cost",
             f"{twin_set / 1e9:.1f} GFLOP a step together.", ""]
    base = {lv: results[TWINS[lv]]["rows"][0]["val_bpc"] for lv in TWINS if TWINS[lv] in results}
    if len(base) == 3:
        lines += ["## Twins", "", "| twin | params | steps | val nats/token | BPC |", "|---|---|---|---|---|"]
        for name, r in sorted(results.items()):
            if name.startswith("dense_"):
                row = r["rows"][0]
                lines.append(f"| {name} | {row['params']:,} | {r['steps']} | {row['val_loss']:.4f} | "
                             f"{row['val_bpc']:.4f} |")
        lines += ["", "## At equal steps", "",
                  "| recipe | config | (0,0) BPC | (0,0) | (1,*) | (2,*) | FLOPs / twin set |",
                  "|---|---|---|---|---|---|---|"]
        for name, sets in RECIPES.items():
            if name in results:
                r = results[name]
                ratio = recipe_flops(DEFAULT + sets, steps) / (twin_set * steps)
                lines.append(f"| {name} | `{' '.join(sets)}` | {r['rows'][0]['val_bpc']:.4f} | "
                             + " | ".join(level_table(r, base)) + f" | {ratio:.2f}x |")
        lines += ["", "## At equal FLOPs", "",
                  "Each twin trains the steps whose twin-set FLOPs equal the recipe's whole run.", "",
                  "| recipe | twin steps | (0,0) | (1,*) | (2,*) |", "|---|---|---|---|---|"]
        for name, sets in RECIPES.items():
            n = equal_flops_steps(DEFAULT + sets, steps)
            names = [twin_name(lv, n, steps) for lv in range(3)]
            if name in results and all(t in results for t in names):
                twins = {lv: results[names[lv]]["rows"][0]["val_bpc"] for lv in range(3)}
                lines.append(f"| {name} | {n} | " + " | ".join(level_table(results[name], twins)) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.6))
    twins = sorted((r["rows"][0]["params"], r["rows"][0]["val_bpc"]) for n, r in results.items()
                   if n in TWINS.values())
    if twins:
        ax.plot(*zip(*twins, strict=True), "k-o", lw=2, label="dense twins (equal steps)")
    for i, name in enumerate(RECIPES):
        if name not in results:
            continue
        pts = [(row["params"], row["val_bpc"]) for row in results[name]["rows"] if row["index"] != "ensemble"]
        ax.plot(*zip(*pts, strict=True), "o", color=f"C{i}", alpha=0.75, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("parameters of the sub-model")
    ax.set_ylabel("validation bits / char")
    ax.set_title("FractalFormer sub-models against dense twins")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = experiment_parser(__doc__, 700, "runs/recipes", [*RECIPES, "equal_flops"])
    a = ap.parse_args()
    root = Path(a.out) / f"steps{a.steps}"
    runs = {TWINS[lv]: twin_sets(DEFAULT, lv) for lv in range(3)}
    runs |= {n: DEFAULT + s for n, s in RECIPES.items()}
    results = finished(root, runs)
    stem = Path(a.docs) / "recipes"

    def one(name: str, sets: list[str], steps: int) -> None:
        print(f"== {name}: {' '.join(sets)} ({steps} steps)", flush=True)
        results[name] = run_one(name, sets, steps, root)
        print(f"   {results[name]['wall_s']:.0f} s; full-model BPC {results[name]['rows'][0]['val_bpc']:.4f}",
              flush=True)
        write_tables(stem, results, report(results, a.steps))

    if not a.report:
        for name, sets in runs.items():
            if name in TWINS.values() or not a.only or name in a.only:
                one(name, sets, a.steps)
        for name, sets in RECIPES.items():
            n = equal_flops_steps(DEFAULT + sets, a.steps)
            if n != a.steps and (not a.only or "equal_flops" in a.only) and name in results:
                for lv in range(3):
                    one(twin_name(lv, n, a.steps), twin_sets(DEFAULT, lv), n)
    results |= finished(root, [twin_name(lv, n, a.steps) for n in range(10, 10 * a.steps, 10)
                               for lv in range(3)])
    write_tables(stem, results, report(results, a.steps))
    plot(results, Path(a.docs).parent / "fractal_recipes.png")


if __name__ == "__main__":
    main()
