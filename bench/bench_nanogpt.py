"""Our dense GPT against a nanoGPT-shaped reference at nanoGPT's CPU "baby" shapes.

    python -m bench.bench_nanogpt [--repeat 30] [--train 2000]

Shapes (nanoGPT's README, char Shakespeare on a CPU): 4 layers, 4 heads, d_model 128,
block 64, batch 12, dropout 0. The reference below is written from that recipe, not
copied: LayerNorm without bias, one fused q/k/v projection, SDPA, a 4x GELU MLP, learned
positions, tied output, AdamW (lr 1e-3, betas 0.9/0.99, weight decay 0.1 on matrices)
and gradient clipping at 1. Ours is ``--preset dense`` at the same shapes (RMSNorm, RoPE,
GeGLU of inner width 4 x d_model with biases: 1.33x the reference's FLOPs per token), and
"ours, FLOP-matched": the GeGLU's inner width cut to 344 without biases, so its MLP has the
reference's parameter count.

Prints, all measured in this run: FLOPs per token (forward + backward, FlopCounterMode),
ms per training step of the bare models (forward, backward, clip, AdamW; interleaved
rounds, median of medians) and tokens/s ratios.
The process keeps freed memory as training does (``device.keep_freed_memory``; both models
run in it); ``--glibc-default`` leaves glibc's trimming on, the page faults included.
With ``--train N`` both are trained N steps on the shipped TinyShakespeare (char) and
evaluated on the same validation batches: nats/char (= nats/token) and bits/char at
equal steps and the wall time each took.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fractalformer.config import RunConfig, build_config
from fractalformer.data.corpus import get_batch
from fractalformer.device import keep_freed_memory
from fractalformer.models import build_model
from fractalformer.runs import prepare_data
from fractalformer.train import make_optimizer
from fractalformer.train.losses import training_loss
from harness import machine, script_parser, timeit

MATCHED = ["mlp_mult=2.6875", "mlp_bias=false"]  # GeGLU 128 -> 2 x 344 -> 128: the 4x GELU MLP's size
SHAPES = ["tokenizer=char", "vocab_size=65", "n_layer=4", "n_head=4", "n_kv_head=4", "head_dim=32",
          "d_model=128", "block_size=64", "batch_size=12", "dropout=0.0", "lr=1e-3", "min_lr=1e-4",
          "warmup_steps=100", "weight_decay=0.1"]


class RefBlock(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d, bias=False)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class RefGPT(nn.Module):
    """The nanoGPT architecture at given shapes (the in-repo proxy of nanoGPT's model.py)."""

    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, d: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.blocks = nn.ModuleList(RefBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def ref_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-3, betas=(0.9, 0.99))


def stepper(model: nn.Module, opt: torch.optim.Optimizer, loss_fn):
    def step() -> None:
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def flops_per_token(loss_fn, tokens: int) -> float:
    with FlopCounterMode(display=False) as fc:
        loss_fn().backward()
    return fc.get_total_flops() / tokens


def lr_at(step: int, steps: int, warmup: int = 100, lr: float = 1e-3, min_lr: float = 1e-4) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    r = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, r))) * (lr - min_lr)


def train_all(cfg: RunConfig, steps: int) -> dict[str, tuple[float, float]]:
    """Train the three models ``steps`` steps on the same batches; (val nats/char, seconds) each."""
    _, corpus = prepare_data(cfg)
    b, t = cfg.train.batch_size, cfg.model.block_size
    gen = torch.Generator().manual_seed(1)
    val_gen = torch.Generator().manual_seed(2)
    val = [get_batch(corpus.val, b, t, val_gen) for _ in range(50)]
    matched = build_config("dense", None, SHAPES + MATCHED)
    models = {}
    for name, c in (("ours", cfg), ("ours, FLOP-matched", matched)):
        torch.manual_seed(0)
        m = build_model(c.model)
        models[name] = (m, make_optimizer(m, c), lambda m, x, y: training_loss(m, m(x), y)[0])
    torch.manual_seed(0)
    ref = RefGPT(65, t, 4, 4, 128)
    models["nanoGPT-shaped"] = (ref, ref_optimizer(ref), lambda m, x, y: m(x, y))
    out = {}
    batches = [get_batch(corpus.train, b, t, gen) for _ in range(steps)]
    for name, (model, opt, loss_of) in models.items():
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = lr_at(i, steps)
            loss_of(model, x, y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        wall = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            loss = sum(float(loss_of(model, x, y)) for x, y in val) / len(val)
        out[name] = (loss, wall)
    return out


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of timing (median of medians)")
    ap.add_argument("--train", type=int, default=0, help="also train the models this many steps")
    ap.add_argument("--compile", action="store_true", help="also time ours under torch.compile (nanoGPT's "
                    "CPU recipe runs eager)")
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's heap trimming on (training turns it off)")
    a = ap.parse_args()
    kept = False if a.glibc_default else keep_freed_memory()
    print(f"machine: {machine()}; freed memory kept: {kept}")
    cfg = build_config("dense", None, SHAPES)
    b, t = cfg.train.batch_size, cfg.model.block_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65, (b, t), generator=gen)
    y = torch.randint(0, 65, (b, t), generator=gen)
    torch.manual_seed(0)
    ours = build_model(cfg.model)
    matched_cfg = build_config("dense", None, SHAPES + MATCHED)
    matched = build_model(matched_cfg.model)
    ref = RefGPT(65, t, 4, 4, 128)
    losses = {"ours": lambda: training_loss(ours, ours(x), y)[0],
              "ours, FLOP-matched": lambda: training_loss(matched, matched(x), y)[0],
              "nanoGPT-shaped": lambda: ref(x, y)}
    models = {"ours": ours, "ours, FLOP-matched": matched, "nanoGPT-shaped": ref}
    steps = {"ours": stepper(ours, make_optimizer(ours, cfg), losses["ours"]),
             "ours, FLOP-matched": stepper(matched, make_optimizer(matched, matched_cfg),
                                           losses["ours, FLOP-matched"]),
             "nanoGPT-shaped": stepper(ref, ref_optimizer(ref), losses["nanoGPT-shaped"])}
    if a.compile:
        for k, m, c in (("ours", ours, cfg), ("ours, FLOP-matched", matched, matched_cfg)):
            fast = torch.compile(m)
            losses[f"{k}, compiled"] = lambda fast=fast, m=m: training_loss(m, fast(x), y)[0]
            models[f"{k}, compiled"] = m
            steps[f"{k}, compiled"] = stepper(m, make_optimizer(m, c), losses[f"{k}, compiled"])
            t0 = time.perf_counter()
            steps[f"{k}, compiled"]()
            print(f"compiling {k}: {time.perf_counter() - t0:.0f} s")
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(a.rounds):  # interleaved, so drift hits all alike
        for k, fn in steps.items():
            times[k].append(timeit(fn, a.repeat, warmup=3))
    print("| model | parameters | training FLOPs / token | ms / step | tokens / s | vs nanoGPT-shaped |")
    print("|---|---|---|---|---|---|")
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for k, v in med.items():
        fpt = flops_per_token(losses[k.replace(", compiled", "")], b * t)
        models[k].zero_grad(set_to_none=True)
        n = sum(p.numel() for p in models[k].parameters())
        print(f"| {k} | {n:,} | {fpt / 1e6:.2f} M | {v * 1000:.2f} | {b * t / v:,.0f} | "
              f"{med['nanoGPT-shaped'] / v:.2f}x |")
    print("(goal: ours, FLOP-matched, >= 1.0x the nanoGPT-shaped tokens/s, eager)")
    if a.train:
        res = train_all(cfg, a.train)
        print(f"\ntrained {a.train} steps on the same batches (validation: 50 fixed batches):")
        print("| model | val nats/char | bits/char | wall s |")
        print("|---|---|---|---|")
        for k, (loss, wall) in res.items():
            print(f"| {k} | {loss:.4f} | {loss / math.log(2):.4f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
