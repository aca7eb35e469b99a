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
    """Train loss (raw and smoothed) and validation loss against step, in nats/token."""
    run_dir = Path(run_dir)
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    train = [float(r["train_loss"]) for r in rows]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, train, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    ax.plot(steps, _ema(train), color="tab:blue", lw=1.6, label="train (smoothed)")
    if val:
        ax.plot(*zip(*val, strict=False), "o-", color="tab:orange", lw=1.6, ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / name
    tmp = run_dir / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
