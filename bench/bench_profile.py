"""Where the time goes: torch.profiler tables of a training step and a decode step (CPU).

    python -m bench.bench_profile [--preset default] [--rows 12] [--steps 3] [--tokens 100]

Prints markdown tables (docs/performance.md): the operators with the most self CPU time
in (1) one all-levels training step of the preset (forward, backward, clipping, AdamW),
(2) the same step with only level 0 computed, and (3) greedy KV-cache decoding of the
full model, one token per step - each with its share of the total and its call count
per step or per token. Shares, not times, are the point: they say what to fix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from fractalformer.config import build_config
from fractalformer.generate import generate
from fractalformer.models import build_model
from fractalformer.train import make_optimizer
from fractalformer.train.losses import training_loss
from harness import machine, script_parser


def table(prof: profile, per: int, unit: str, rows: int) -> str:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    out = [f"| operator | share of self CPU time | calls per {unit} |", "|---|---|---|"]
    for e in events[:rows]:
        out.append(f"| `{e.key}` | {100 * e.self_cpu_time_total / total:.1f}% | {e.count / per:.0f} |")
    out.append(f"| (total) | {total / per / 1000:.1f} ms per {unit} under the profiler | |")
    return "\n".join(out)


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=100)
    a = ap.parse_args()
    print(f"machine: {machine()}\n")
    cfg = build_config(a.preset, None, a.set)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    b, t, v = cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size
    x = torch.randint(0, v, (b, t), generator=gen)
    y = torch.randint(0, v, (b, t), generator=gen)

    def level0() -> torch.Tensor:
        return F.cross_entropy(model(x, [0])[0][0].flatten(0, 1), y.flatten())

    cases = [(f"all {len(cfg.model.sub_models())} sub-models", lambda: training_loss(model, model(x), y)[0])]
    if cfg.model.nesting.levels > 1:
        cases.append(("level 0 alone", level0))
    for name, loss_fn in cases:
        def step(loss_fn=loss_fn) -> None:
            loss_fn().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                step()
        print(f"### Training step, {name} (batch {b} x {t})\n\n{table(prof, a.steps, 'step', a.rows)}\n")
    model.eval()
    prompt = list(range(16))
    list(generate(model, prompt, 8, temperature=0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        list(generate(model, prompt, a.tokens, temperature=0))
    print(f"### Decoding, full model, KV cache, batch 1\n\n{table(prof, a.tokens, 'token', a.rows)}")


if __name__ == "__main__":
    main()
