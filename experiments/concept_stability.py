"""Why the concept preset stalled under a short lr warmup: the first steps of training.

    python -m experiments.concept_stability VARIANT [--steps 40] [--set KEY=VALUE ...]

Trains the ``concept`` preset (``dense`` for VARIANT ``dense``) on the 100-step schedule
with a 10-step warmup, stops after ``--steps`` steps and prints the training loss
(nats/token) every 5 steps; same seed and batches for every variant. Variants patch the
initialisation or the concept inputs of the model:

* ``open``: the read gate ``read_scale`` starts at 1, which stalls on the unigram plateau
  at ~4.1-4.2 nats/token;
* ``closed``: the gate starts at 0 (the preset's ``concept_read_init=0``);
* ``o0``: the gate at 1 but every cross-attention output projection starts at 0;
* ``detach``: the gate at 1, the concept levels built from detached token embeddings;
* ``small_plans``: the gate at 1, plans scaled to the token stream's RMS (0.02) instead of 1;
* ``dense``: the dense reference.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import torch

from fractalformer.config import build_config
from fractalformer.models import concept
from fractalformer.train import train
from harness import script_parser

VARIANTS = ("open", "closed", "o0", "detach", "small_plans", "dense")


def patch(variant: str) -> None:
    """Change the concept model's initialisation (or inputs) for ``variant``."""
    reset = concept.ConceptGPT.reset_parameters

    def reset_parameters(self: concept.ConceptGPT) -> None:
        reset(self)
        if not hasattr(self, "read_scale"):
            return
        if variant == "o0":
            for reader in self.readers:
                for x in getattr(reader, "cross", []):
                    torch.nn.init.zeros_(x.o.weight)
        if variant == "small_plans":  # RMSNorm scales by (1 + w)
            for norm in self.plan_norms:
                torch.nn.init.constant_(norm.weight, self.config.init_std - 1.0)

    concept.ConceptGPT.reset_parameters = reset_parameters
    if variant == "detach":
        add = concept.ConceptGPT.add_units
        concept.ConceptGPT.add_units = lambda self, state, emb, total: add(self, state, emb.detach(), total)


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--set", action="append", default=[], help="override a key of the model")
    a = ap.parse_args()
    patch(a.variant)
    gate = [] if a.variant == "dense" else [f"concept_read_init={0 if a.variant == 'closed' else 1}"]
    schedule = ["max_steps=100", "warmup_steps=10", "sample_tokens=0", "eval_every=50"]
    sets = [] if a.variant == "dense" else ["concept_share=false"]  # the preset of the diagnosis
    cfg = build_config("dense" if a.variant == "dense" else "concept", None,
                       [*sets, *gate, *a.set, *schedule])
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run", stop_after=a.steps, progress=False)
        with (Path(tmp) / "run" / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
    print(a.variant, " ".join(a.set), " ".join(f"{r['step']}:{float(r['train_loss']):.3f}" for r in rows
                                             if int(r["step"]) % 5 == 0))


if __name__ == "__main__":
    main()
