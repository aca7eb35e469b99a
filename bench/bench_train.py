"""Training throughput (tokens/s) of a config, eager and optionally torch.compile.

    python -m bench.bench_train [--preset default] [--set key=value ...] [--steps 10] [--compile] [--bf16]

Prints the machine, then tokens/s per variant (fp32 eager; torch.compile; bf16 autocast,
which on CPU needs native bf16 matmuls such as AVX512-BF16 or AMX to pay) and its ratio
to the first (eager) one, all measured in this run.
"""

from __future__ import annotations

import contextlib

import torch

from fractalformer.config import build_config
from fractalformer.models import build_model
from fractalformer.train import make_optimizer
from fractalformer.train.losses import training_loss
from harness import machine, script_parser, timeit


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast on CPU (CUDA runs bf16)")
    a = ap.parse_args()
    cfg = build_config(a.preset, None, a.set)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, t = cfg.train.batch_size, cfg.model.block_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (b, t), generator=gen).to(device)
    y = torch.randint(0, cfg.model.vocab_size, (b, t), generator=gen).to(device)
    print(f"machine: {machine()}")
    print(f"config: preset {a.preset} {' '.join(a.set)} | batch {b} x {t} tokens | device {device}")
    cuda = device == "cuda"
    variants = [("eager", False, cuda)] + ([("torch.compile", True, cuda)] if a.compile else [])
    variants += [("bf16 autocast", False, True)] if a.bf16 and not cuda else []
    base = None
    for name, compiled, use_bf16 in variants:
        bf16 = torch.autocast(device, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device)
        opt = make_optimizer(model, cfg)
        fwd = torch.compile(model) if compiled else model

        def step(fwd=fwd, opt=opt, model=model, bf16=bf16) -> None:
            with bf16:
                loss = training_loss(model, fwd(x), y)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        sec = timeit(step, a.steps, warmup=3)
        tps = b * t / sec
        base = base or tps
        print(f"{name:>14}: {sec * 1000:8.1f} ms/step  {tps:10,.0f} tokens/s  {tps / base:5.2f}x eager")


if __name__ == "__main__":
    main()
