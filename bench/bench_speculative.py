"""Speculative decoding with nested drafts vs plain KV-cache decoding, measured in one run.

    python bench/bench_speculative.py RUN [--tokens 200] [--gamma 4] [--prompt TEXT] [--repeat 2]

For a trained FractalFormer run: plain greedy decoding of the full model (baseline),
then speculative greedy decoding with a single draft at every level (index 0) and with
several drafts in parallel (every sub-model of a level), fixed gamma and adaptive.
Prints acceptance rate alpha, mean tokens per target call, draft/target cost ratio c
and tokens/s with its ratio to the baseline. Greedy output is checked to be identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine

import fractalformer
from fractalformer.generate import SpecStats, generate, speculate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--prompt", default="KING RICHARD III:\n")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    model = fractalformer.load(a.run)
    ids = model.tokenizer.encode(a.prompt)
    n = min(a.tokens, model.config.block_size - len(ids))
    print(f"machine: {machine()}")
    print(f"run: {a.run} ({model.num_params():,} params, d_model {model.config.d_model}) | prompt "
          f"{len(ids)} tokens, {n} new tokens, greedy, batch 1")

    def best_rate(fn) -> tuple[float, list[int]]:
        best, out = 0.0, []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = list(fn())
            best = max(best, len(out) / (time.perf_counter() - t0))
        return best, out

    base, ref = best_rate(lambda: generate(model, ids, n, temperature=0))
    print(f"\n{'setting':<38} {'alpha':>6} {'tok/call':>8} {'c':>6} {'tokens/s':>9} {'vs plain':>8}")
    print(f"{'plain decoding (KV cache)':<38} {'':>6} {'1.00':>8} {'':>6} {base:9.0f} {'1.00x':>8}")
    settings = [(f"draft {lv}:0", [(lv, 0)]) for lv in range(1, model.nest.levels)]
    for lv in range(1, model.nest.levels):
        if model.nest.count(lv) > 1:
            settings.append((f"{model.nest.count(lv)} drafts, level {lv}",
                             [(lv, j) for j in range(model.nest.count(lv))]))
    for name, drafts in settings:
        for adaptive in (False, True):
            stats = SpecStats()

            def run(drafts=drafts, adaptive=adaptive, stats=stats):
                stats.__init__()
                return speculate(model, ids, n, drafts, a.gamma, temperature=0, adaptive=adaptive,
                                 stats=stats)

            rate, out = best_rate(run)
            assert out == ref, f"{name}: speculative output differs from plain greedy decoding"
            label = f"{name}, gamma {'<=' if adaptive else '='}{a.gamma}{' adaptive' if adaptive else ''}"
            print(f"{label:<38} {stats.alpha:6.3f} {stats.tokens_per_target_call:8.2f} "
                  f"{stats.cost_ratio:6.2f} {rate:9.0f} {rate / base:7.2f}x")


if __name__ == "__main__":
    main()
