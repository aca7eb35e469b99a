"""What an eager decode step is made of: its ops, their cost alone, and the threads.

    python -m bench.bench_decode_ops [--preset default] [--rounds 3]

For the preset's full model decoding one token with the KV cache (inside
``frozen_weights``, as ``generate`` runs it): (1) the number of top-level tensor ops of one
step, by name; (2) what the step's kinds of op cost one at a time in a tight loop at
decode shapes, against the measured step; (3) ms per token at 1 and at 2 threads,
interleaved over ``--rounds``, to see whether intra-op threads cost or help at this size.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bench.bench_sample import per_token
from fractalformer.config import build_config
from fractalformer.models import build_model
from fractalformer.nn.decode import frozen_weights
from harness import machine, script_parser, timeit


def micro_us(fn) -> float:
    """Median microseconds per call of ``fn`` in a tight loop (after a warm-up)."""
    return timeit(fn, 2000, warmup=200) * 1e6


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    cfg = build_config(a.preset, None, [])
    c = cfg.model
    torch.manual_seed(0)
    model = build_model(c).eval()
    print(f"machine: {machine()}; preset {a.preset}")

    with torch.no_grad(), frozen_weights():
        caches = model.new_cache(1, [0])
        idx = torch.randint(0, c.vocab_size, (1, 8))
        model(idx, cache=caches)
        x = idx[:, -1:]
        for _ in range(3):
            model(x, cache=caches)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x, cache=caches)

        def step() -> None:  # always the 9th position: the cache never fills
            caches[0].length = 8
            model(x, cache=caches)

        step_us = timeit(step, 200, warmup=20) * 1e6
    ops = Counter(e.name for e in prof.events() if e.cpu_parent is None)
    print(f"\n{sum(ops.values())} top-level ops per step: "
          + ", ".join(f"{n} {k.removeprefix('aten::')}" for k, n in ops.most_common()))

    d, hd = c.d_model, c.head_dim
    v = torch.randn(1, 1, 1, d)
    s, w = torch.randn(d), torch.randn(3 * d, d)
    q, k = torch.randn(1, c.n_head, 1, hd), torch.randn(1, c.n_kv_head, c.block_size, hd)
    mask = torch.zeros(1, c.block_size)
    gqa = {"enable_gqa": True} if c.n_kv_head != c.n_head else {}
    with torch.no_grad():
        costs = {  # name -> (the step's op, us per call alone)
            "rms_norm (F.rms_norm)": ("rms_norm", micro_us(lambda: F.rms_norm(v, (d,), s, 1e-6))),
            f"linear, 1 row, {d} -> {3 * d}": ("linear", micro_us(lambda: F.linear(v, w))),
            f"attention over {c.block_size} cached slots": ("scaled_dot_product_attention", micro_us(
                lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask, **gqa))),
            "add": ("add", micro_us(lambda: v + v)),
            "slice (a view)": ("slice", micro_us(lambda: v[..., : d // 2])),
        }
    print(f"\nOne op alone, tight loop, times its calls in a step (the step itself: {step_us:.0f} us):\n")
    print("| op at decode shapes | us per call | calls per step | us per step |\n|---|---|---|---|")
    for name, (op, us) in costs.items():
        n = ops[f"aten::{op}"]
        print(f"| {name} | {us:.1f} | {n} | {us * n:.0f} |")

    print("\n| round | threads | ms / token (full model, KV cache) |\n|---|---|---|")
    prompt = list(range(16))
    for r in range(a.rounds):
        for th in (1, 2):
            torch.set_num_threads(th)
            print(f"| {r} | {th} | {per_token(model, 0, prompt, 200, True, 3) * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
