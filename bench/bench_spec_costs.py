"""What speculative decoding would gain at a model size, from its measured costs.

    python -m bench.bench_spec_costs [RUN] [--preset fractal-512] [--alpha 0.76 0.83] [--compile]

The speedup of speculative decoding is ``E(alpha, gamma) / (gamma * draft + verify)``
plain steps, with ``E = (1 - alpha**(gamma + 1)) / (1 - alpha)`` tokens a round. The
costs (a plain target step, a draft step, a verification round of ``gamma + 1``
positions with its acceptance and rollback) do not depend on training, so they are
measured here on the model of ``RUN``, or on untrained weights of ``--preset`` when no
run exists, eager and with ``--compile``. The acceptance ``alpha`` does depend on
training: give the ones measured on a trained run (default: the trained ``fractal-512``
of docs/speculative.md, 0.76 for a width-128 draft and 0.83 for a width-256 one).
Prints, for every draft level, the measured costs and the predicted speedup at the best
gamma for each alpha.
"""

from __future__ import annotations

import time
from functools import partial

import torch

import fractalformer
from fractalformer.config import build_config
from fractalformer.generate import SpecStats, generate, speculate
from fractalformer.generate.spec_policy import expected_tokens
from fractalformer.models import build_model
from fractalformer.nn.decode import frozen_weights
from harness import machine, script_parser


def best_time(fn, repeat: int) -> float:
    """Best seconds of running the generator ``fn()`` to its end, over ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in fn():
            pass
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("run", nargs="?")
    ap.add_argument("--preset", default="fractal-512")
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.76, 0.83])
    ap.add_argument("--gamma", type=int, default=4, help="gamma of the measured rounds")
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure the compiled costs")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    if a.run:
        model, what = fractalformer.load(a.run).model, a.run
    else:
        model, what = build_model(build_config(a.preset).model).eval(), f"--preset {a.preset}, untrained"
    model = model.float()
    prompt = torch.randint(0, model.config.vocab_size, (min(32, model.config.block_size // 4),)).tolist()
    n = min(a.tokens, model.config.block_size - len(prompt) - a.gamma - 1)
    print(f"machine: {machine()}")
    print(f"model: {what} ({model.num_params():,} params, d_model {model.config.d_model}, float32); "
          f"{n} tokens, gamma {a.gamma}, best of {a.repeat}")
    print(f"{'mode':9}{'draft':>6}{'plain ms':>10}{'draft ms':>10}{'verify ms':>11}{'c':>7}{'v/plain':>9}"
          + "".join(f"{f'x at a={al}':>14}" for al in a.alpha))
    with frozen_weights():  # drafts extracted (and compiled) once
        for compile in [False, True] if a.compile else [False]:
            mode = "compiled" if compile else "eager"
            run_plain = partial(generate, model, prompt, n, temperature=0, compile=compile)
            list(run_plain())  # warm-up (and compile)
            prefill = best_time(partial(generate, model, prompt, 1, temperature=0, compile=compile), a.repeat)
            plain = (best_time(run_plain, a.repeat) - prefill) / (n - 1)  # a decode step, prefill excluded
            for lv in range(1, model.nest.levels):
                runs = []
                for i in range(a.repeat + 1):  # the first run warms up (and compiles)
                    st = SpecStats()
                    list(speculate(model, prompt, n, [(lv, 0)], a.gamma, adaptive=False, compile=compile,
                                   stats=st))
                    if i:
                        runs.append(st)
                best = min(runs, key=lambda s: s.draft_time + s.verify_time)
                draft, verify = best.draft_time / best.draft_calls, best.verify_time / best.rounds
                gains = [max(expected_tokens(al, g) * plain / (g * draft + verify) for g in range(1, 9))
                         for al in a.alpha]
                print(f"{mode:9}{f'{lv}:0':>6}{plain * 1e3:10.2f}{draft * 1e3:10.2f}{verify * 1e3:11.2f}"
                      f"{draft / verify:7.2f}{verify / plain:9.2f}" + "".join(f"{g:13.2f}x" for g in gains))


if __name__ == "__main__":
    main()
