"""Mix'n'Match: every mix of a FractalFormer's levels over its layers, scored and plotted.

A mix runs each layer at a level of its own (``FractalFormer.mix_forward``); with 3 levels
and 4 layers there are 81. Scoring all of them on the same validation windows as the
trained sub-models shows the sizes between the trained ones: the Pareto front of bits per
character against parameters.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from ..evaluate import to_bpc
from ..io import atomic_write
from ..models import FractalFormer

MAX_MIXES = 729  # 3 levels over 6 layers; deeper models are not enumerated


def mixable(model: torch.nn.Module) -> bool:
    """Whether ``analyze`` scores the model's mixes: a FractalFormer with whole-head nesting, no
    cross-level residuals, and at most :data:`MAX_MIXES` of them."""
    c = model.config
    return (isinstance(model, FractalFormer) and c.nesting.residual == "none"
            and c.nesting.attn_nesting == "heads" and c.nesting.levels**c.n_layer <= MAX_MIXES)


def _loss(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of (B, T, V) logits on the windows' own tokens."""
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten()))


@torch.no_grad()
def mix_scores(model: FractalFormer, windows: torch.Tensor, units_per_token: float) -> dict:
    """Every per-layer mix and every trained sub-model on ``windows`` (N, T): parameters, nats
    per token and bits per unit. The trained sub-models are scored on the same windows."""
    model.eval()
    mixes = []
    for levels in itertools.product(range(model.nest.levels), repeat=model.config.n_layer):
        mix = tuple((lv, lv) for lv in levels)
        loss = _loss(model.mix_forward(windows, mix)[0][0], windows)
        mixes.append({"mix": ",".join(map(str, levels)), "params": model.mix_params(mix), "loss": loss,
                      "bpc": to_bpc(loss, units_per_token)})
    trained = []
    for lv, logits in model(windows).items():
        for j in range(logits.shape[0]):
            loss = _loss(logits[j], windows)
            trained.append({"sub_model": [lv, j], "params": model.num_params(lv), "loss": loss,
                            "bpc": to_bpc(loss, units_per_token)})
    front, best = [], float("inf")
    for m in sorted(mixes, key=lambda m: (m["params"], m["bpc"])):
        if m["bpc"] < best:
            front.append(m["mix"])
            best = m["bpc"]
    return {"windows": list(windows.shape), "mixes": mixes, "trained": trained, "front": front}


def plot_mixes(scores: dict, path: Path, unit: str) -> Path:
    """Bits per unit against parameters: every mix, its Pareto front, the trained sub-models."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    mixes = scores["mixes"]
    ax.scatter([m["params"] for m in mixes], [m["bpc"] for m in mixes], s=14, color="tab:grey", alpha=0.6,
               label=f"the {len(mixes)} mixes (a level per layer)")
    front = [m for m in mixes if m["mix"] in set(scores["front"])]
    front.sort(key=lambda m: m["params"])
    ax.plot([m["params"] for m in front], [m["bpc"] for m in front], "-o", color="tab:red", ms=4, lw=1.4,
            label="Pareto front of the mixes")
    for m in front:
        ax.annotate(m["mix"], (m["params"], m["bpc"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    levels = sorted({t["sub_model"][0] for t in scores["trained"]})
    for lv in levels:
        pts = [t for t in scores["trained"] if t["sub_model"][0] == lv]
        ax.scatter([t["params"] for t in pts], [t["bpc"] for t in pts], marker="D", s=30, color=f"C{lv}",
                   zorder=3, label=f"trained sub-models, level {lv}")
    ax.set_xscale("log")
    ax.set_xlabel("parameters used")
    ax.set_ylabel(f"validation bits / {unit}")
    ax.set_title(f"Mix'n'Match on {scores['windows'][0]} validation windows of {scores['windows'][1]} tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
