"""Training curves from a run's metrics.csv, drawn headless."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from ..errors import FractalError
from ..io import atomic_write
from .logs import FULL_TRAIN, parse_sub_name

LEVEL_COLOURS = ["Greys", "Blues", "Oranges", "Greens", "Purples", "Reds"]


def ema(values: list[float], alpha: float = 0.05) -> list[float]:
    """Bias-corrected exponential moving average (as Adam's moments): no pull towards the first value."""
    out, acc = [], 0.0
    for n, v in enumerate(values, 1):
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc / (1 - (1 - alpha) ** n))
    return out


def _sub_colour(level: int, index: int, count: int) -> tuple[float, ...]:
    """One colour family per level, one shade per sub-model within it."""
    cmap = plt.get_cmap(LEVEL_COLOURS[level % len(LEVEL_COLOURS)])
    return cmap(0.9 if count == 1 else 0.45 + 0.5 * index / (count - 1))


def read_metrics(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a ``metrics.csv``: a whole step and a training loss in every row and a
    number or nothing in every other column (a row cut short by a crash lacks its last values);
    anything else is a one-line error rather than a plot of garbage."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FractalError(f"{path} cannot be read as a metrics table ({e})") from None
    train = FULL_TRAIN if FULL_TRAIN in header else "train_loss"
    if "step" not in header or train not in header:
        raise FractalError(f"{path} is not a metrics table: its header has no step and {train} columns")
    for line, row in enumerate(rows, 2):
        try:
            if None in row:  # more values than columns
                raise ValueError(f"{len(row[None])} values too many")
            int(row["step"])
            if not row[train] and train != FULL_TRAIN:  # empty: the step's sample (sampling) left it out
                raise ValueError(f"no {train}")
            for value in row.values():
                if value:
                    float(value)
        except (ValueError, TypeError) as e:
            raise FractalError(f"{path} is not a metrics table: line {line} ({e})") from None
    return header, rows


def plot_curves(run_dir: str | Path, name: str = "curves.png") -> Path:
    """Loss (nats/token) against step: the full model's train and validation loss, like with like.

    Nested runs get a second panel with the validation loss of every sub-model: one colour
    family per level, one shade per sub-model, level ensembles dashed - so a sub-model that
    does not learn stands out. Before the first evaluation the panels say so.
    """
    run_dir = Path(run_dir)
    header, rows = read_metrics(run_dir / "metrics.csv")
    nested = FULL_TRAIN in header
    fig, axes = plt.subplots(1, 2 if nested else 1, figsize=(12 if nested else 7, 4.4), squeeze=False)
    ax = axes[0][0]
    key = FULL_TRAIN if nested else "train_loss"
    steps = [int(r["step"]) for r in rows if r[key]]  # sampling: steps that trained the full model
    train = [float(r[key]) for r in rows if r[key]]
    if train:
        ax.plot(steps, train, color="tab:blue", alpha=0.25, lw=0.8, label="train, each step's batch")
        span = min(0.3, max(0.02, 20 / len(train)))  # about a twentieth of the run: short runs lag less
        ax.plot(steps, ema(train, span), color="tab:blue", lw=1.6, label="train, moving average")
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="tab:orange", lw=1.6, ms=3, label="validation")
    ax.set_title(f"{run_dir.name}: full model" + (" (level 0)" if nested else ""))
    if nested:
        _sub_model_panel(axes[0][1], rows, header)
    for a in axes[0]:
        a.set_xlabel("training step")
        a.set_ylabel("loss (nats/token)")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7 if a is not ax else 8, ncol=1 if a is ax else 2)
        else:
            a.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=a.transAxes, color="grey")
    fig.tight_layout()
    path = run_dir / name
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def _sub_model_panel(ax: plt.Axes, rows: list[dict[str, str]], header: list[str]) -> None:
    subs = {k: s for k in header if k.startswith("val_") and (s := parse_sub_name(k[len("val_"):]))}
    counts: dict[int, int] = {}
    for level, index in subs.values():
        if index != "ensemble":
            counts[level] = counts.get(level, 0) + 1
    for key, (level, index) in subs.items():
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if not pts:
            continue
        if index == "ensemble":
            ax.plot(*zip(*pts, strict=True), "--", color=_sub_colour(level, 0, 1), lw=1.4,
                    label=f"level {level} ensemble")
        else:
            colour = _sub_colour(level, int(index), counts[level])
            ax.plot(*zip(*pts, strict=True), "-o", color=colour, lw=1.2, ms=2.5, label=f"({level}, {index})")
    ax.set_title("validation loss of every sub-model (level, index)")
