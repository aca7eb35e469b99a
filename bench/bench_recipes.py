"""Seconds a training step of every FractalFormer recipe, against the full model alone and the
seven dense twins it replaces.

    python -m bench.bench_recipes [--steps 24] [--rounds 3]

Every recipe of ``experiments.recipes`` runs the trainer's own step (``train.trainer``:
batch, the step's sampled levels, loss, backward - with ``level_grads=pcgrad`` the
per-level backward and the surgery - clipping, AdamW) for the first ``--steps`` steps of
its schedule, so a sampled recipe is timed on its real mix of levels. Baselines, timed the
same way in the same run: the full-width dense twin alone, and the sum of the seven twins
(1 full, 2 half, 4 quarter). Rounds are interleaved; the median round is printed.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from experiments.recipes import DEFAULT, RECIPES, twin_sets
from fractalformer.config import build_config
from fractalformer.train.trainer import set_lr, setup, train_step
from harness import machine, script_parser


def step_seconds(sets: list[str], steps: int, folder: Path) -> float:
    """Mean seconds of the trainer's step over the first ``steps`` steps of ``sets``."""
    cfg = build_config("dense", None, [*sets, "sample_tokens=0", f"max_steps={max(steps, 200)}"])
    s = setup(cfg, folder, resume=False, progress=False)
    s.model.train()
    for step in range(2):  # warm-up
        set_lr(s, step)
        train_step(s, step)
    t0 = time.perf_counter()
    for step in range(steps):
        set_lr(s, step)
        float(train_step(s, step)[0])  # the loss read back, as a sync every step would
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(f"machine: {machine()}")
    cases = {f"dense twin, level {lv}": twin_sets(DEFAULT, lv) for lv in range(3)}
    cases |= {name: DEFAULT + sets for name, sets in RECIPES.items()}
    times: dict[str, list[float]] = {k: [] for k in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for i, (name, sets) in enumerate(cases.items()):
                times[name].append(step_seconds(sets, a.steps, Path(tmp) / f"{r}-{i}"))
    med = {k: statistics.median(v) for k, v in times.items()}
    full = med["dense twin, level 0"]
    seven = sum(2**lv * med[f"dense twin, level {lv}"] for lv in range(3))
    print(f"\n{a.steps} steps a case, median of {a.rounds} interleaved rounds\n")
    print("| case | s / step | vs the full model alone | vs the seven twins |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / full:.2f}x | {v / seven:.2f}x |")
    print(f"| the seven twins (sum) | {seven:.3f} | {seven / full:.2f}x | 1.00x |")


if __name__ == "__main__":
    main()
