"""Sampling throughput at batch 1, with and without the KV cache.

    python bench/bench_sample.py [RUN_DIR | --preset default] [--tokens 200] [--prompt-len 16]

Without a run folder the model is randomly initialised (speed does not depend on the
weights). Prints tokens/s for each mode and the cache's speedup, measured in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine

import fractalformer
from fractalformer.config import build_config
from fractalformer.generate import generate
from fractalformer.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if a.run:
        model = fractalformer.load(a.run)
    else:
        torch.manual_seed(0)
        model = build_model(build_config(a.preset, None, a.set).model).eval()
    prompt = list(range(a.prompt_len))
    print(f"machine: {machine()}")
    print(f"model: {model.num_params():,} params, context {model.config.block_size} | prompt "
          f"{a.prompt_len} tokens, {a.tokens} new tokens, batch 1, greedy")
    rates = {}
    for name, cache in (("no cache", False), ("KV cache", True)):
        list(generate(model, prompt, 8, temperature=0, use_cache=cache))  # warm-up
        best = 0.0
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            n = sum(1 for _ in generate(model, prompt, a.tokens, temperature=0, use_cache=cache))
            best = max(best, n / (time.perf_counter() - t0))
        rates[name] = best
        print(f"{name:>9}: {best:8,.0f} tokens/s  {best / rates['no cache']:5.2f}x no-cache")


if __name__ == "__main__":
    main()
