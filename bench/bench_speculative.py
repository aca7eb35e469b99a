"""Speculative decoding with nested drafts vs plain KV-cache decoding, measured in one run.

    python -m bench.bench_speculative RUN [--tokens 200] [--gamma 4] [--prompt TEXT ...] [--repeat 3]

For a trained FractalFormer run: plain greedy decoding of the full model (the baseline),
then speculative greedy decoding with a single draft at every level (index 0) and with
every sub-model of a level drafting in parallel, at fixed gamma and adaptive. Prints
acceptance rate alpha, mean tokens per target call, draft/verify cost ratio c, the share
of tokens decoded plainly by the adaptive fallback, and tokens/s with its ratio to the
baseline (best of ``--repeat``, summed over the prompts; each setting's baseline runs
alternate with its own runs), and on how many prompts the text is token for token the
plain greedy text (always, in float32; bf16 matmuls round differently for 1 and for
gamma + 1 positions, so a near-tie may flip). ``--markdown`` prints the table
as Markdown for the docs.
"""

from __future__ import annotations

import time

import torch

import fractalformer
from fractalformer.generate import SpecStats, generate, speculate
from fractalformer.generate.spec_policy import forget_costs
from fractalformer.nn.decode import frozen_weights
from harness import machine, script_parser

PROMPTS = ["KING RICHARD III:\n", "ROMEO:\nO, ", "First Citizen:\nWe are"]


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("run")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--prompt", action="append", help=f"repeatable (default: {PROMPTS})")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--cold", action="store_true", help="every generation measures the costs afresh (by "
                    "default a process's first generation of a setting measures them, the rest reuse them)")
    ap.add_argument("--confidence", type=float, default=0.0, help="early stop of drafts (see speculate)")
    ap.add_argument("--compile", action="store_true", help="torch.compile plain decoding, drafts and target "
                    "(compiles happen in the first, untimed-best run)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights and activations of target and drafts (bf16 needs native CPU support)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    frozen_weights().__enter__()  # one block for the whole bench: drafts are extracted (and compiled) once
    trained = fractalformer.load(a.run)
    model = trained.model.to(getattr(torch, a.dtype))
    prompts = [trained.tokenizer.encode(p) for p in a.prompt or PROMPTS]
    lengths = [min(a.tokens, model.config.block_size - len(ids)) for ids in prompts]
    print(f"machine: {machine()}")
    print(f"run: {a.run} ({model.num_params():,} params, d_model {model.config.d_model}, "
          f"{model.config.n_layer} layers, {a.dtype}) | {len(prompts)} prompts x {lengths[0]} new tokens, "
          f"greedy, batch 1, best of {a.repeat}, costs measured "
          f"{'by every generation' if a.cold else 'once per setting'}")

    def timed(fn, ids: list[int], n: int) -> tuple[float, list[int]]:
        best, out = float("inf"), []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = list(fn(ids, n))
            best = min(best, time.perf_counter() - t0)
        return best, out

    refs, base_time = [], 0.0
    for ids, n in zip(prompts, lengths, strict=True):
        t, out = timed(lambda ids, n: generate(model, ids, n, temperature=0, compile=a.compile), ids, n)
        refs.append(out)
        base_time += t
    total = sum(lengths)
    base = total / base_time
    rows = [("plain decoding (KV cache)", "", "1.00", "", "", f"{base:.0f}", "1.00x", "")]
    show(rows[-1], a.markdown, header=True)
    settings = [(f"draft {lv}:0", [(lv, 0)]) for lv in range(1, model.nest.levels)]
    for lv in range(1, model.nest.levels):
        n = model.nest.count(lv)
        if n > 1:
            settings.append((f"{n} drafts (level {lv})", [(lv, j) for j in range(n)]))
    plain = lambda ids, n: generate(model, ids, n, temperature=0, compile=a.compile)  # noqa: E731
    for name, drafts in settings:
        for adaptive in (False, True):
            stats, elapsed, plain_time, same = SpecStats(), 0.0, 0.0, 0
            for ids, n, ref in zip(prompts, lengths, refs, strict=True):
                one = SpecStats()

                def run(ids, n, drafts=drafts, adaptive=adaptive, one=one):
                    one.__init__()
                    if a.cold:
                        forget_costs(model)
                    return speculate(model, ids, n, drafts, a.gamma, temperature=0, adaptive=adaptive,
                                     confidence=a.confidence, stats=one, compile=a.compile)

                # plain and speculative runs alternate, so a slow spell of the machine hits both
                (tp, _), (t, out) = timed_pair(plain, run, ids, n, a.repeat)
                same += out == ref
                elapsed += t
                plain_time += tp
                merge(stats, one)
            rate = total / elapsed
            label = f"{name}, {'adaptive gamma <= ' if adaptive else 'gamma = '}{a.gamma}"
            rows.append((label, f"{stats.alpha:.3f}", f"{stats.tokens_per_target_call:.2f}",
                         f"{stats.cost_ratio:.2f}", f"{stats.plain_tokens / stats.tokens:.0%}", f"{rate:.0f}",
                         f"{plain_time / elapsed:.2f}x", f"{same}/{len(prompts)}"))
            show(rows[-1], a.markdown)


def timed_pair(first, second, ids: list[int], n: int, repeat: int) -> list[tuple[float, list[int]]]:
    """Best-of-``repeat`` wall time and output of two generators, run alternately."""
    best = [(float("inf"), []), (float("inf"), [])]
    for _ in range(repeat):
        for i, fn in enumerate((first, second)):
            t0 = time.perf_counter()
            out = list(fn(ids, n))
            best[i] = min(best[i], (time.perf_counter() - t0, out), key=lambda x: x[0])
    return best


def merge(into: SpecStats, one: SpecStats) -> None:
    for f in ("target_calls", "draft_calls", "examined", "accepted", "tokens", "plain_tokens", "rounds",
              "draft_time", "verify_time", "plain_time"):
        setattr(into, f, getattr(into, f) + getattr(one, f))


def show(row: tuple[str, ...], markdown: bool, header: bool = False) -> None:
    names = ("setting", "alpha", "tokens/target call", "c", "plain share", "tokens/s", "vs plain",
             "same text")
    if markdown:
        if header:
            print("| " + " | ".join(names) + " |\n|" + "---|" * len(names))
        print("| " + " | ".join(row) + " |")
    else:
        if header:
            print(f"\n{names[0]:<40} {names[1]:>6} {'tok/call':>8} {'c':>5} {'plain':>6} {'tok/s':>7} "
                  f"{'vs':>6} {'same':>5}")
        widths = (-40, 6, 8, 5, 6, 7, 6, 5)
        print(" ".join(f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
