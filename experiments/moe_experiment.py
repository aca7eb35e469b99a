"""FractalMoE against the dense reference: PEER, PKM and FHME at equal steps.

    python -m experiments.moe_experiment [--steps 1400] [--out runs/moe] [--only NAME ...] [--data DIR]

Every run uses the dense reference's data, dims and schedule (shipped TinyShakespeare,
bpe128, batch 16 x 256, AdamW 3e-3 -> 3e-4 cosine, the same seed and batches) with
sparse layers in place of the MLP of layers 1 and 3 (the ``peer`` / ``pkm`` / ``fhme``
presets), varied one knob at a time. Full-split validation, expert usage and wall time
go to ``<out>/steps<N>/<name>/eval.json`` (finished runs are skipped on a re-run); the
table goes to ``docs/results/moe_experiment_<N>.md`` and ``.json``. ``--data DIR`` trains on a
prepared corpus instead (its own tokenizer; e.g. the standard library's sources,
``fractalformer prepare :stdlib --split files --tokenizer bpe:4096 --out DIR``): runs go to
``<out>/steps<N>-<DIR's name>``, the table to ``moe_experiment_<N>_<DIR's name>`` and the
validation curves (against steps and wall time) to ``docs/moe_curves_<N>_<DIR's name>.png``.
FLOPs: one training step (forward and backward) counted by torch's FlopCounterMode.
Several copies may run side by side on different ``--only`` lists (set ``OMP_NUM_THREADS``
to share the cores).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

import fractalformer
from fractalformer.config import build_config
from harness import (
    cached_result,
    data_sets,
    experiment_parser,
    finished,
    machine,
    read_metrics,
    step_flops,
    timed_train,
    write_tables,
)

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense", []),
    "pkm": ("pkm", []),
    "peer_4k": ("peer", ["n_experts=4096"]),
    "peer_65k": ("peer", []),
    "peer_262k": ("peer", ["n_experts=262144"]),
    "peer_1m": ("peer", ["n_experts=1048576", "moe_sparse=true"]),
    "peer_h1k32": ("peer", ["moe_heads=1", "moe_topk=32"]),
    "peer_h8k4": ("peer", ["moe_heads=8", "moe_topk=4"]),
    "peer_with_mlp": ("peer", ["moe_with_mlp=true"]),
    "peer_fixes": ("peer", ["moe_shared=true", "moe_gated=true", "usage_weight=0.1", "rekey_every=100"]),
    "peer_rekey": ("peer", ["rekey_every=100"]),
    "peer_usage": ("peer", ["usage_weight=0.1"]),
    "peer_gated": ("peer", ["moe_gated=true"]),
    "peer_shared": ("peer", ["moe_shared=true"]),
    "fhme": ("fhme", []),
    "fhme_full_depth": ("fhme", ["fhme_adaptive=false"]),
    "fhme_halt_0.01": ("fhme", ["halt_penalty=0.01"]),
}


def run_one(name: str, steps: int, root: Path, data: str | None = None) -> dict:
    folder = root / name
    preset, sets = VARIANTS[name]
    sets = [*sets, *(data_sets(data) if data else [])]

    def compute() -> dict:
        cfg = build_config(preset, None, [*sets, f"max_steps={steps}", "sample_tokens=0", "eval_every=100"])
        flops = step_flops(cfg)
        res, wall = timed_train(cfg, folder)
        model = fractalformer.load(folder).model
        row = res.final[0].to_json()
        metrics = read_metrics(folder)
        return {"name": name, "preset": preset, "sets": sets, "steps": steps, "wall_s": wall,
                "step_flops": flops,
                "params": model.num_params(),
                "active_params": (model.active_params(row.get("mean_depth"))
                                  if hasattr(model, "active_params") else model.num_params()),
                "train_loss_last": float(metrics[-1]["train_loss"]),
                "val_curve": [(int(r["step"]), float(r["elapsed_s"]), float(r["val_loss"]))
                              for r in metrics if r.get("val_loss")],
                "row": row}

    return cached_result(folder, compute)


def _f(r: dict, key: str, fmt: str) -> str:
    v = r["row"].get(key)
    return format(v, fmt) if v is not None else "-"


def report(results: dict[str, dict], steps: int, data: str | None = None) -> str:
    on = f" on {Path(data).name}" if data else ""
    lines = [f"# FractalMoE vs the dense reference ({steps} steps{on})", "",
             f"Machine: {machine()}.", "",
             f"Command: `python -m experiments.moe_experiment --steps {steps}"
             f"{f' --data {data}' if data else ''}`. BPC = bits per character on",
             "the full validation split; gap = train loss of the last step minus validation loss",
             "(nats/token; the train figure is one batch). Usage, KL and dead are over the",
             "validation split (see docs/moe.md for their definitions).", "",
             "| run | config | params | active | FLOPs/step | val nats/token | BPC | vs dense | "
             "val - train | usage | KL | dead | mean depth | compute saved | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = results.get("dense")
    for name in VARIANTS:
        r = results.get(name)
        if r is None:
            continue
        row = r["row"]
        vs = f"{row['val_bpc'] - dense['row']['val_bpc']:+.4f}" if dense else "-"
        gap = row["val_loss"] - r["train_loss_last"]
        flops = f"{r['step_flops'] / 1e9:.1f} G" if "step_flops" in r else "-"
        lines.append(
            f"| {name} | {r['preset']} {' '.join(r['sets'])} | {r['params']:,} | {r['active_params']:,} | "
            f"{flops} | {row['val_loss']:.4f} | {row['val_bpc']:.4f} | {vs} | {gap:+.3f} | "
            f"{_f(r, 'expert_usage', '.1%')} | {_f(r, 'expert_kl', '.3f')} | "
            f"{_f(r, 'dead_experts', '.1%')} | {_f(r, 'mean_depth', '.2f')} | "
            f"{_f(r, 'compute_saved', '.1%')} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    """Validation (nats/token, the trainer's fixed batches) against steps and against wall
    time: equal steps are about equal FLOPs here (the FLOPs column), equal time is the other
    budget a user has."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, r in results.items():
        curve = r.get("val_curve") or []
        if not curve:
            continue
        steps, secs, val = zip(*curve, strict=True)
        style = {"color": "black", "linewidth": 2} if name == "dense" else {}
        axes[0].plot(steps, val, label=name, **style)
        axes[1].plot([t / 60 for t in secs], val, label=name, **style)
    axes[0].set(xlabel="step (16 x 256 tokens)", ylabel="validation nats/token", title=title)
    axes[1].set(xlabel="wall time, min (one thread, a run beside it)", title="against wall time")
    lows = [v for r in results.values() for _, _, v in (r.get("val_curve") or [])[2:]]
    if lows:
        axes[0].set_ylim(min(lows) - 0.05, max(lows) + 0.1)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = experiment_parser(__doc__, 1400, "runs/moe", list(VARIANTS))
    ap.add_argument("--data", help="a prepared corpus folder (default: the shipped TinyShakespeare)")
    a = ap.parse_args()
    suffix = f"-{Path(a.data).name}" if a.data else ""
    root = Path(a.out) / f"steps{a.steps}{suffix}"
    for name in [] if a.report else a.only or VARIANTS:
        print(f"== {name}", flush=True)
        r = run_one(name, a.steps, root, a.data)
        print(f"   {r['wall_s']:.0f} s; BPC {r['row']['val_bpc']:.4f}", flush=True)
    results = finished(root, VARIANTS)
    stem = f"moe_experiment_{a.steps}{suffix.replace('-', '_')}"
    write_tables(Path(a.docs) / stem, results, report(results, a.steps, a.data))
    if a.data:
        plot(results, Path(a.docs).parent / f"moe_curves_{a.steps}{suffix.replace('-', '_')}.png",
             f"FractalMoE on {Path(a.data).name}, {a.steps} steps")


if __name__ == "__main__":
    main()
