"""FractalFormer training-step speed, as ratios measured in one run.

    python -m bench.bench_fractal [--repeat 5] [--batch 16] [--compile]

On the default dims (levels 3, split 2, batch 16 x 256), one step = forward, backward
and AdamW update:

(a) all 7 sub-models in one FractalFormer step (``head_dim`` nesting) vs the same 7 shapes
    as 7 separate dense GPTs on the same batch (sum of their step times);
(b) all 7 vs level 0 alone (the same model, only the full-width level computed), for
    ``heads`` nesting with 4 KV heads, and for ``head_dim`` nesting;
(c) a seed-style step: a Python loop over the 7 sub-models, each a dense forward through
    weights sliced out of the full ones, for comparison with the batched levels.
With ``--compile`` the batched step is also timed under ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fractalformer.config import RunConfig, build_config
from fractalformer.models import GPT, build_model
from fractalformer.nn.nesting import nested_parameters
from fractalformer.train import make_optimizer
from fractalformer.train.losses import training_loss
from harness import machine, script_parser, timeit


def stepper(model: torch.nn.Module, loss_fn, cfg: RunConfig):
    opt = make_optimizer(model, cfg)

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--modes", nargs="+", choices=("head_dim", "heads"), default=["head_dim", "heads"],
                    help="which nestings to time")
    a = ap.parse_args()
    print(f"machine: {machine()}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (a.batch, 256), generator=gen)
    y = torch.randint(0, 128, (a.batch, 256), generator=gen)
    times: dict[str, float] = {}

    def train_loss(m: torch.nn.Module, fwd: torch.nn.Module | None = None):
        """The training loss of ``m`` on the batch, its forward run through ``fwd`` (compiled)."""
        return lambda: training_loss(m, (fwd or m)(x), y)[0]

    def measure(name: str, step) -> float:
        times[name] = timeit(step, a.repeat, warmup=2)
        print(f"  {name:<52} {times[name] * 1000:8.1f} ms/step", flush=True)
        return times[name]

    for mode, extra in (("head_dim", []), ("heads", ["attn_nesting=heads", "n_kv_head=4"])):
        if mode not in a.modes:
            continue
        cfg = build_config(None, None, ["family=fractal", "levels=3", f"batch_size={a.batch}", *extra])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        print(f"{mode} nesting ({model.num_params():,} parameters):")
        measure(f"{mode}: all 7 sub-models, batched levels", stepper(model, train_loss(model), cfg))

        def level0(m=model) -> torch.Tensor:
            lg = m(x, [0])[0][0]
            return F.cross_entropy(lg.flatten(0, 1), y.flatten())

        measure(f"{mode}: level 0 alone", stepper(model, level0, cfg))
        subs = cfg.model.sub_models()
        total = 0.0
        for lv in range(cfg.model.nesting.levels):
            dense_cfg = RunConfig(model.sub_model_config(lv), cfg.train)
            dense = GPT(dense_cfg.model)
            t = timeit(stepper(dense, train_loss(dense), dense_cfg), a.repeat, warmup=2)
            total += t * model.nest.count(lv)
        times[f"{mode}: 7 separate dense models (sum)"] = total
        print(f"  {mode + ': 7 separate dense models (sum)':<52} {total * 1000:8.1f} ms/step")

        nested = [(name, dims) for name, _, dims in nested_parameters(model)]
        shells = {lv: GPT(model.sub_model_config(lv)) for lv in range(cfg.model.nesting.levels)}

        def seed_loop(m=model, subs=subs, nested=nested, shells=shells) -> torch.Tensor:
            params = dict(m.named_parameters())
            loss = 0.0
            for lv, j in subs:
                sliced = {name: m.nest.take(params[name], lv, dims)[j] for name, dims in nested}
                logits = functional_call(shells[lv], sliced, (x,))
                loss = loss + training_loss(shells[lv], logits, y)[0] / len(subs)
            return loss

        measure(f"{mode}: seed-style loop over sliced sub-models", stepper(model, seed_loop, cfg))
        if a.compile:
            compiled = torch.compile(model)
            measure(f"{mode}: all 7, torch.compile", stepper(model, train_loss(model, compiled), cfg))
            measure(f"{mode}: level 0 alone, torch.compile", stepper(model, torch.compile(level0), cfg))

    def ratio(n: str, d: str) -> str:
        return f"{times[n] / times[d]:.2f}x" if n in times and d in times else "not timed"

    print("\nratios (lower is better):")
    print(f"(a) head_dim: all 7 batched / 7 separate dense models = "
          f"{ratio('head_dim: all 7 sub-models, batched levels', 'head_dim: 7 separate dense models (sum)')}"
          "  (goal <= 0.9x)")
    print(f"(b) heads:    all 7 / level 0 alone = "
          f"{ratio('heads: all 7 sub-models, batched levels', 'heads: level 0 alone')}  (goal <= 2.0x)")
    print(f"    head_dim: all 7 / level 0 alone = "
          f"{ratio('head_dim: all 7 sub-models, batched levels', 'head_dim: level 0 alone')}")
    for mode in a.modes:
        batched = f"{mode}: all 7 sub-models, batched levels"
        print(f"(c) {mode}: seed-style loop / batched levels = "
              f"{ratio(f'{mode}: seed-style loop over sliced sub-models', batched)}")
        if a.compile:
            print(f"    {mode}: torch.compile / eager = "
                  f"{ratio(f'{mode}: all 7, torch.compile', batched)}; compiled all 7 / compiled level 0 = "
                  f"{ratio(f'{mode}: all 7, torch.compile', f'{mode}: level 0 alone, torch.compile')}")


if __name__ == "__main__":
    main()
