"""Training curves from a run's metrics.csv, drawn headless."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _ema(values: list[float], alpha: float = 0.05) -> list[float]:
    out, acc = [], values[0] if values else 0.0
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_curves(run_dir: str | Path, name: str = "curves.png") -> Path:
    """Loss against step in nats/token: smoothed train and validation, one colour per sub-model.

    A dense run has one sub-model; a nested run gets a line per (level, index), with
    level ensembles dashed, so a sub-model that does not learn stands out.
    """
    run_dir = Path(run_dir)
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    subs = [k for k in (rows[0] if rows else {}) if k.startswith("train_") and k != "train_loss"]
    fig, axes = plt.subplots(1, 2 if subs else 1, figsize=(12 if subs else 7, 4.2), squeeze=False)
    ax = axes[0][0]
    train = [float(r["train_loss"]) for r in rows]
    ax.plot(steps, train, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    ax.plot(steps, _ema(train), color="tab:blue", lw=1.6, label="train (smoothed)")
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="tab:orange", lw=1.6, ms=3,
                label="validation (full model)")
    ax.set_title(f"{run_dir.name}: {'weighted total' if subs else 'loss'}")
    if subs:
        ax2 = axes[0][1]
        cmap = plt.get_cmap("viridis")
        val_keys = [k[len("val_"):] for k in rows[0] if k.startswith("val_") and k[4:5].isdigit()]
        levels = max(int(k.split(".")[0]) for k in val_keys) + 1
        for key in val_keys:
            level = int(key.split(".")[0])
            pts = [(int(r["step"]), float(r[f"val_{key}"])) for r in rows if r.get(f"val_{key}")]
            if pts:
                ens = key.endswith("ens")
                colour = cmap(level / max(1, levels - 1) * 0.85)
                ax2.plot(*zip(*pts, strict=True), "--" if ens else "-", color=colour,
                         lw=1.2, marker="" if ens else "o", ms=2,
                         label=f"({key.replace('.ens', ', ens')})" if ens else f"({key.replace('.', ', ')})")
        ax2.set_title("validation loss of every sub-model (level, index)")
        ax2.legend(fontsize=7, ncol=2)
    for a in axes[0]:
        a.set_xlabel("step")
        a.set_ylabel("loss (nats/token)")
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / name
    tmp = run_dir / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
