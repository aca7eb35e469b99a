"""The next-concept predictor against the dense reference at equal steps, FLOPs and wall time.

    python -m experiments.concept_experiment [--steps 500] [--out runs/concept] [--only NAME ...]

Every run uses the dense reference's data and schedule (shipped TinyShakespeare, batch
16 x 256 bpe128 tokens or 8 x 512 bytes, AdamW 3e-3 -> 3e-4 cosine over ``--steps``, the
same seed and batches); the concept runs vary one knob of the ``concept`` preset at a time.
Training FLOPs are counted by ``torch.utils.flop_counter`` on one training step (forward
and backward). "At equal FLOPs" / "at equal wall time" read the dense run's validation
curve (the fixed validation batches) where it had spent as much as the concept run in all.
Results go to ``<out>/steps<N>/<name>/eval.json`` (finished runs are skipped on a re-run)
and the table to ``docs/results/concept_experiment_<N>[_warmup<W>].md`` and ``.json``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import fractalformer
from fractalformer.config import build_config
from harness import (
    cached_result,
    experiment_parser,
    finished,
    machine,
    read_metrics,
    step_flops,
    timed_train,
    write_tables,
)

BYTE = ["tokenizer=byte", "vocab_size=256", "block_size=512", "batch_size=8"]
# The rows named "concept..." have separate weights per level (concept_share=false, the
# configuration of most rows of the docs' tables); "shared" is the concept preset.
SEP = ["concept_share=false"]
# the fast decoder: 2 shared blocks, 1 of them per concept level, plans added
LEAN = ["n_layer=2", "concept_read=add", "concept_layers=1"]
# a 4-block concept-byte model: 4 shared blocks, every one per concept level, cross-attention
BYTE4 = ["n_layer=4", "concept_layers=0", "concept_read=cross"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense", []),
    "concept": ("concept", SEP),
    # the read gate open at init (read_scale 1), which stalls on the unigram plateau under a
    # short warmup (experiments.concept_stability)
    "read_open": ("concept", [*SEP, "concept_read_init=1"]),
    "dense_byte": ("dense", BYTE),
    "concept_byte": ("concept-byte", [*BYTE4, *SEP]),
    "concept_byte_shared": ("concept-byte", BYTE4),  # the 4-block shared byte model
    # ablations, one knob of the separate-weights configuration each
    "no_regression": ("concept", [*SEP, "concept_weight=0"]),
    "add": ("concept", [*SEP, "concept_read=add"]),
    "shared": ("concept", ["concept_share=true"]),  # the concept preset
    "sum_combiner": ("concept", [*SEP, "combiner=sum"]),
    "combo2": ("concept", [*SEP, "combo=2"]),
    "combo8": ("concept", [*SEP, "combo=8"]),
    "one_level": ("concept", [*SEP, "concept_levels=1"]),
    # a 2-block token level under 4-block concept levels (Block Transformer's trade), by
    # cross-attention and by addition (the fastest decoder: python -m bench.bench_concept)
    "token2": ("concept", [*SEP, "n_layer=2", "concept_layers=4"]),
    "token2_add": ("concept", [*SEP, "n_layer=2", "concept_layers=4", "concept_read=add"]),
    # a 1-block token level reading its plan by addition: the decoder that could decode
    # 1.5x faster than dense (python -m bench.bench_concept)
    "token1_add": ("concept", [*SEP, "n_layer=1", "concept_layers=4", "concept_read=add"]),
    # leaner byte models, for concept-byte at dense byte's FLOPs: one concept block
    # per level, read by cross-attention or by addition
    "byte_l1": ("concept-byte", [*BYTE4, "concept_layers=1"]),
    "byte_lean": ("concept-byte", [*BYTE4, "concept_layers=1", "concept_read=add"]),
    # a second seed of both sides of the byte comparison (init and batches)
    "byte_lean_seed1": ("concept-byte", [*BYTE4, "concept_layers=1", "concept_read=add", "seed=1"]),
    # the fast decoder's shape on bytes (byte_l2_lean is the concept-byte preset):
    # 2 or 3 shared blocks, 1 per concept level
    "byte_l2_lean": ("concept-byte", LEAN),
    "byte_l3_lean": ("concept-byte", ["n_layer=3", "concept_read=add", "concept_layers=1"]),
    "dense_byte_seed1": ("dense", [*BYTE, "seed=1"]),
    # the control for the lean byte model at equal FLOPs: dense byte, as shallow, more steps
    "dense_byte_l2": ("dense", [*BYTE, "n_layer=2"]),
    "byte_l2_lean_seed1": ("concept-byte", [*LEAN, "seed=1"]),
    "dense_byte_l2_seed1": ("dense", [*BYTE, "n_layer=2", "seed=1"]),
    # shallower shared models: the decoder that could reach the 4-block dense
    # model's quality with half its blocks per token
    "shared_l2": ("concept", ["n_layer=2"]),
    "shared_l2_add": ("concept", ["n_layer=2", "concept_read=add"]),
    "shared_l1_add": ("concept", ["n_layer=1", "concept_read=add"]),
    "shared_l2_add_c1": ("concept", LEAN),
    "shared_l2_add_c1_combo8": ("concept", [*LEAN, "combo=8"]),
    "shared_l2_add_c1_combo8_seed1": ("concept", [*LEAN, "combo=8", "seed=1"]),
    # trained past 1,400 steps the lean model gets no better (2,269 steps); does dropout help?
    "lean_do": ("concept", [*LEAN, "dropout=0.1"]),
    "lean_combo8_do": ("concept", [*LEAN, "combo=8", "dropout=0.1"]),
    "dense_seed1": ("dense", ["seed=1"]),
    "dense_l2": ("dense", ["n_layer=2"]),  # shallower dense models: whose quality does token1_add reach?
    "dense_l3": ("dense", ["n_layer=3"]),
    "dense_l8": ("dense", ["n_layer=8"]),  # a deeper one: the dense model of the shared preset's quality?
    # effective context at the same units per step: the token level attends to the last 256
    # units (token_window, which needs separate weights), the concept levels read the whole
    # 1,024 / 4,096; the dense twins with the same window (same token-level reach and cost)
    # and with full attention
    "ctx1024": ("concept", [*SEP, "block_size=1024", "batch_size=4", "token_window=256"]),
    "dense_window1024": ("dense", ["block_size=1024", "batch_size=4", "token_window=256"]),
    "ctx4096": ("concept", [*SEP, "block_size=4096", "batch_size=1", "token_window=256"]),
    "dense_ctx1024": ("dense", ["block_size=1024", "batch_size=4"]),
}


def run_one(name: str, steps: int, root: Path, warmup: int) -> dict:
    folder = root / name
    preset, sets = VARIANTS[name]

    def compute() -> dict:
        cfg = build_config(preset, None, [*sets, f"max_steps={steps}", f"warmup_steps={warmup}",
                                          "sample_tokens=0", "eval_every=50"])
        flops = step_flops(cfg)
        res, wall = timed_train(cfg, folder)
        metrics = read_metrics(folder)
        curve = [(int(r["step"]), float(r["elapsed_s"]), float(r["val_loss"]), float(r["val_bpc"]))
                 for r in metrics if r.get("val_loss")]
        return {"name": name, "preset": preset, "sets": sets, "steps": steps, "warmup": warmup,
                "wall_s": wall, "params": fractalformer.load(folder).model.num_params(), "step_flops": flops,
                "train_s_per_step": float(metrics[-1]["elapsed_s"]) / steps, "val_curve": curve,
                "row": res.final[0].to_json()}

    return cached_result(folder, compute)


def at(curve: list, x: float, axis: int) -> float | None:
    """Validation bits/char of a curve, linearly interpolated at ``x`` on ``axis`` (0 step, 1 s)."""
    for a, b in itertools.pairwise(curve):
        if a[axis] <= x <= b[axis]:
            w = (x - a[axis]) / (b[axis] - a[axis]) if b[axis] > a[axis] else 0.0
            return a[3] + w * (b[3] - a[3])
    return None


def report(results: dict[str, dict], steps: int, warmup: int) -> str:
    lines = [f"# Next-concept predictor vs the dense reference ({steps} steps, warmup {warmup})", "",
             f"Machine: {machine()}; other jobs shared the 2 cores, so wall times are only roughly "
             "comparable (quality at equal steps is exact).", "",
             f"Command: `python -m experiments.concept_experiment --steps {steps} --warmup {warmup}`. "
             "BPC = bits per character "
             "(per byte for byte runs) on the full validation split. FLOPs: one training step counted by "
             "torch's FlopCounterMode. 'dense at equal FLOPs / wall' = the dense run of the same tokenizer "
             "interpolated on its validation curve (fixed validation batches) at the concept run's total "
             "FLOPs / wall time; 'run at dense's FLOPs / wall' = this run's curve at the dense run's "
             "totals (mid-schedule for a run that costs more, so it favours dense); '-' where a curve "
             "did not get that far. Curve figures are on the fixed validation batches, not the full "
             "split.", "",
             "| run | config | params | FLOPs/step | s/step | val nats/token | BPC | "
             "vs dense (equal steps) | dense at equal FLOPs | run at dense's FLOPs | dense at equal wall | "
             "run at dense's wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        r = results.get(name)
        if r is None:
            continue
        row = r["row"]
        ref = results.get("dense_byte" if "byte" in name else "dense")
        vs, cells = "-", ["-"] * 4
        if ref is not None and ref is not r:
            vs = f"{row['val_bpc'] - ref['row']['val_bpc']:+.4f}"
            ratio = r["step_flops"] / ref["step_flops"]
            found = [at(ref["val_curve"], steps * ratio, 0), at(r["val_curve"], steps / ratio, 0),
                     at(ref["val_curve"], r["wall_s"], 1), at(r["val_curve"], ref["wall_s"], 1)]
            cells = [f"{v:.4f}" if v is not None else "-" for v in found]
        lines.append(f"| {name} | {r['preset']} {' '.join(r['sets'])} | {r['params']:,} | "
                     f"{r['step_flops'] / 1e9:.1f} G | {r['train_s_per_step']:.2f} | {row['val_loss']:.4f} | "
                     f"{row['val_bpc']:.4f} | {vs} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = experiment_parser(__doc__, 500, "runs/concept", list(VARIANTS))
    ap.add_argument("--warmup", type=int, default=100, help="warmup steps (the presets' 100 by default)")
    a = ap.parse_args()
    root = Path(a.out) / f"steps{a.steps}"
    for name in [] if a.report else a.only or VARIANTS:
        print(f"== {name}", flush=True)
        r = run_one(name, a.steps, root, a.warmup)
        print(f"   {r['wall_s']:.0f} s; BPC {r['row']['val_bpc']:.4f}", flush=True)
    results = finished(root, VARIANTS)
    stem = Path(a.docs) / f"concept_experiment_{a.steps}{'' if a.warmup == 100 else f'_warmup{a.warmup}'}"
    write_tables(stem, results, report(results, a.steps, a.warmup))


if __name__ == "__main__":
    main()
