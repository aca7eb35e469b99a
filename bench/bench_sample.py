"""Decoding speed at batch 1: every sub-model, with and without the KV cache.

    python -m bench.bench_sample [RUN_DIR | --preset default] [--tokens 200] [--prompt-len 16]

Without a run folder the model is randomly initialised (speed does not depend on the
weights). For every level, sub-model ``(level, 0)`` decodes greedily, as ``sample --level L``
does (a lone sub-model runs as its extracted dense model): ms per token, tokens/s, and the
achieved bandwidth - the sub-model's weights (which a decode step reads once) per
second. ``--compile`` adds the ``torch.compile``'d decode step (``sample --compile``).
With ``--floor`` it also prints the time of the step's matmuls alone (the same
matrix-vector products with no model around them), so the rest - the per-token
overhead - can be read off. Ratios are against the same run's no-cache decoding.
"""

from __future__ import annotations

import time

import torch

import fractalformer
from fractalformer.config import build_config
from fractalformer.generate import generate
from fractalformer.models import build_model
from harness import machine, script_parser


def per_token(model: torch.nn.Module, level: int, prompt: list[int], tokens: int, cache: bool,
              repeat: int, compile: bool = False) -> float:
    """Best seconds per generated token of sub-model ``(level, 0)`` over ``repeat`` greedy runs
    (with ``compile``: each run after its own compile, which is not counted)."""
    kw = dict(temperature=0, use_cache=cache, level=level, **({"compile": True} if compile else {}))
    best = float("inf")
    for _ in range(repeat):
        gen = generate(model, prompt, tokens + 40, **kw)
        for _ in range(40):  # warm-up (and compile) inside the generation that is timed
            next(gen)
        t0 = time.perf_counter()
        n = sum(1 for _ in gen)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def matmul_floor(model: torch.nn.Module, repeat: int = 200) -> float:
    """Seconds for one token's matrix-vector products (every 2-D weight once, plus the head)."""
    mats = [p.detach() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name]
    mats.append(model.embed.weight.detach())
    x = {m.shape[1]: torch.randn(1, m.shape[1]) for m in mats}
    with torch.no_grad():
        for _ in range(20):
            for m in mats:
                torch.mm(x[m.shape[1]], m.t())
        t0 = time.perf_counter()
        for _ in range(repeat):
            for m in mats:
                torch.mm(x[m.shape[1]], m.t())
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("run", nargs="?")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--floor", action="store_true", help="also time the bare matmuls of a step")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    a = ap.parse_args()
    if a.run:
        model = fractalformer.load(a.run).model
    else:
        torch.manual_seed(0)
        model = build_model(build_config(a.preset, None, a.set).model).eval()
    prompt = list(range(a.prompt_len))
    print(f"machine: {machine()}")
    print(f"model: {model.num_params():,} params, context {model.config.block_size} | prompt "
          f"{a.prompt_len} tokens, {a.tokens} new tokens, batch 1, greedy, float32")
    print("| sub-model | width | weights | no cache ms/token | KV cache ms/token | tokens/s | vs no cache "
          "| weights GB/s |" + (" compiled ms/token | compiled vs eager |" if a.compile else "")
          + (" matmuls ms | overhead ms |" if a.floor else ""))
    print("|---" * (8 + 2 * a.compile + 2 * a.floor) + "|")
    for level in range(model.nest.levels):
        if not model.extractable(level):
            continue
        sub = model.extract(level, 0).eval() if model.nest.levels > 1 else model
        nbytes = sum(p.numel() * p.element_size() for p in sub.parameters())
        plain = per_token(model, level, prompt, a.tokens, False, a.repeat)
        cached = per_token(model, level, prompt, a.tokens, True, a.repeat)
        row = (f"| ({level}, 0) | {sub.config.d_model} | {nbytes / 2**20:.2f} MiB | {plain * 1e3:.3f} | "
               f"{cached * 1e3:.3f} | {1 / cached:,.0f} | {plain / cached:.2f}x | "
               f"{nbytes / cached / 1e9:.2f} |")
        if a.compile:
            fast = per_token(model, level, prompt, a.tokens, True, 1, compile=True)  # a compile per run
            row += f" {fast * 1e3:.3f} | {cached / fast:.2f}x |"
        if a.floor:
            floor = matmul_floor(sub)
            row += f" {floor * 1e3:.3f} | {(cached - floor) * 1e3:.3f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
