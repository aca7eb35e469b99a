"""Speed of the next-concept predictor against the dense reference, measured in one run.

    python bench/bench_concept.py [--preset concept] [--set KEY=VALUE] [--tokens 200] [--repeat 3]
                                  [--no-context] [--json FILE]

* Decode: greedy tokens/s with KV caches at batch 1 and 16 (a 16-token prompt, then
  ``--tokens`` single-token steps), concept model / dense model.
* Context: one training step (forward + backward) at 256, 1,024 and 4,096 tokens of
  context with 4,096 tokens per step (batch 16 / 4 / 1), concept model / dense model.

Weights are untrained (speed does not depend on them). Ratios > 1 mean the concept model
is faster. Both models run in the same process, interleaved, so machine load hits both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, timeit

from fractalformer.config import build_config
from fractalformer.models import build_model


def model_of(preset: str, sets: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(build_config(preset, None, sets).model)


@torch.no_grad()
def decode(model: torch.nn.Module, batch: int, tokens: int) -> None:
    prompt = torch.randint(0, model.config.vocab_size, (batch, 16))
    caches = model.new_cache(batch)
    logits = model.run(prompt, [0], caches)[0][0]
    for _ in range(tokens):
        logits = model.run(logits[:, -1].argmax(-1, keepdim=True), [0], caches)[0][0]


def train_step(model: torch.nn.Module, batch: int, block: int) -> None:
    x = torch.randint(0, model.config.vocab_size, (batch, block))
    _, loss, _ = model(x, x)
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="concept")
    ap.add_argument("--set", action="append", default=[], help="override a key of the concept model")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-context", action="store_true", help="decode figures only")
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args()
    print(f"machine: {machine()}")
    out: dict = {"machine": machine(), "preset": a.preset, "sets": a.set, "decode": {}, "context": {}}
    dense, concept = model_of("dense", []), model_of(a.preset, a.set)
    dense.eval()
    concept.eval()
    print(f"dense {dense.num_params():,} parameters; {a.preset} {concept.num_params():,}")
    for batch in (1, 16):
        t_d = timeit(lambda b=batch: decode(dense, b, a.tokens), a.repeat, 1)
        t_c = timeit(lambda b=batch: decode(concept, b, a.tokens), a.repeat, 1)
        row = {"dense_tok_s": batch * a.tokens / t_d, "concept_tok_s": batch * a.tokens / t_c,
               "ratio": t_d / t_c}
        out["decode"][batch] = row
        print(f"decode batch {batch:>2}: dense {row['dense_tok_s']:8.1f} tok/s | concept "
              f"{row['concept_tok_s']:8.1f} tok/s | concept/dense speed {row['ratio']:.2f}x")
    for block in () if a.no_context else (256, 1024, 4096):
        batch = 4096 // block
        sets = [f"block_size={block}", f"batch_size={batch}"]
        d, c = model_of("dense", sets), model_of(a.preset, [*a.set, *sets])
        t_d = timeit(lambda m=d, b=batch, k=block: train_step(m, b, k), a.repeat, 1)
        t_c = timeit(lambda m=c, b=batch, k=block: train_step(m, b, k), a.repeat, 1)
        out["context"][block] = {"dense_s": t_d, "concept_s": t_c, "ratio": t_d / t_c}
        print(f"train step, context {block:>4} x batch {batch:>2}: dense {t_d:6.3f} s | concept {t_c:6.3f} s"
              f" | concept/dense speed {t_d / t_c:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
