"""Speed of the next-concept predictor against the dense reference, measured in one run.

    python -m bench.bench_concept [--preset concept] [--set KEY=VALUE ...] [--dense-set KEY=VALUE ...]
                                  [--run DIR] [--dense-run DIR] [--tokens 200] [--repeat 3] [--rounds 3]
                                  [--window 256] [--no-context] [--json FILE]

* Decode: greedy tokens/s with KV caches at batch 1 and 16 (a 16-token prompt, then
  ``--tokens`` single-token steps), the concept model (``--preset`` and ``--set``) against
  the dense model (``--preset dense`` and ``--dense-set``: pick the dense model of the
  concept model's quality, e.g. ``--dense-set n_layer=6``). Ratio = concept / dense speed.
  ``--run`` / ``--dense-run`` decode trained run folders instead: with a variable
  chunking the chunks a model makes - and so how often its concept levels run - are its
  own, so its decode speed is measured on the trained model.
* Context: one training step (forward + backward) at 256, 1,024 and 4,096 units of
  context with 4,096 units per step (batch 16 / 4 / 1): the dense model with full
  attention, the dense model and the concept model with the token level's attention
  limited to the last ``--window`` units (``token_window``; the concept levels read the
  whole context). Each time is also given relative to the same model at 256 units: the
  effective-context goal is a longer reach at about the same step time.

Weights are untrained unless ``--run`` (speed does not depend on them, but for chunks).
Models run in the same process, interleaved, so machine load hits all of them alike.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from fractalformer import load
from fractalformer.config import build_config
from fractalformer.models import build_model
from fractalformer.nn.decode import frozen_weights
from fractalformer.train.losses import training_loss
from harness import machine, script_parser, timeit


def model_of(preset: str, sets: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(build_config(preset, None, sets).model)


@torch.no_grad()
def decode(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> None:
    """Greedy decoding of ``tokens`` after ``prompt`` (B, T) as ``generate`` runs it: weights
    frozen for the generation."""
    caches = model.new_cache(prompt.shape[0])
    with frozen_weights():
        logits = model(prompt, [0], caches)[0][0]
        for _ in range(tokens):
            logits = model(logits[:, -1].argmax(-1, keepdim=True), [0], caches)[0][0]


def prompt(model: torch.nn.Module, batch: int) -> torch.Tensor:
    """A random 16-unit prompt for each of ``batch`` rows."""
    return torch.randint(0, model.config.vocab_size, (batch, 16))


def train_step(model: torch.nn.Module, batch: int, block: int) -> None:
    x = torch.randint(0, model.config.vocab_size, (batch, block))
    loss, _ = training_loss(model, model(x), x)
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--preset", default="concept")
    ap.add_argument("--set", action="append", default=[], help="override a key of the concept model")
    ap.add_argument("--dense-set", action="append", default=[], help="override a key of the dense model")
    ap.add_argument("--run", help="decode this trained concept run folder (not --preset / --set)")
    ap.add_argument("--dense-run", help="decode this trained dense run folder (not --dense-set)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved decode rounds (median ratio)")
    ap.add_argument("--window", type=int, default=256, help="token_window of the context section")
    ap.add_argument("--contexts", type=int, nargs="*", default=[256, 1024, 4096])
    ap.add_argument("--no-context", action="store_true", help="decode figures only")
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args()
    print(f"machine: {machine()}")
    out: dict = {"machine": machine(), "preset": a.preset, "sets": a.set, "dense_sets": a.dense_set,
                 "decode": {}, "context": {}}
    dense = load(a.dense_run).model if a.dense_run else model_of("dense", a.dense_set)
    concept = load(a.run).model if a.run else model_of(a.preset, a.set)
    out.update(run=a.run, dense_run=a.dense_run)
    dense.eval()
    concept.eval()
    print(f"dense {a.dense_run or ' '.join(a.dense_set)}: {dense.num_params():,} parameters; "
          f"{a.run or a.preset + ' ' + ' '.join(a.set)}: {concept.num_params():,}")
    for batch in (1, 16):
        t_d, t_c = [], []
        for _ in range(a.rounds):  # interleaved, so the machine's drift hits both alike
            t_d.append(timeit(lambda b=batch: decode(dense, prompt(dense, b), a.tokens), a.repeat, 1))
            t_c.append(timeit(lambda b=batch: decode(concept, prompt(concept, b), a.tokens), a.repeat, 1))
        ratios = sorted(d / c for d, c in zip(t_d, t_c, strict=True))
        row = {"dense_tok_s": batch * a.tokens / statistics.median(t_d),
               "concept_tok_s": batch * a.tokens / statistics.median(t_c),
               "ratio": statistics.median(ratios), "ratio_range": [ratios[0], ratios[-1]]}
        out["decode"][batch] = row
        print(f"decode batch {batch:>2}: dense {row['dense_tok_s']:8.1f} tok/s | concept "
              f"{row['concept_tok_s']:8.1f} tok/s | concept/dense speed {row['ratio']:.2f}x "
              f"(rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x)")
    base: dict[str, float] = {}
    for block in () if a.no_context else a.contexts:
        batch = max(4096 // block, 1)
        sets = [f"block_size={block}", f"batch_size={batch}"]
        window = [f"token_window={a.window}"] if block > a.window else []  # a window >= block is none
        models = {"dense": model_of("dense", [*a.dense_set, *sets]),
                  "dense_window": model_of("dense", [*a.dense_set, *sets, *window]),
                  "concept_window": model_of(a.preset, [*a.set, *sets, *window])}
        row = {name: timeit(lambda m=m, b=batch, k=block: train_step(m, b, k), a.repeat, 1)
               for name, m in models.items()}
        base = base or dict(row)
        out["context"][block] = {"seconds": row, "vs_256": {n: row[n] / base[n] for n in row}}
        print(f"train step, context {block:>4} x batch {batch:>2}: "
              + " | ".join(f"{n} {row[n]:6.3f} s ({row[n] / base[n]:.2f}x its first context)" for n in row))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
