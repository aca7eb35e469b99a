"""FractalMoE speed and memory against dense layers, as ratios measured in one run.

    python -m bench.bench_moe [--repeat 5] [--json FILE] [--only layers steps decode]

1. One layer, forward + backward over 16 x 256 tokens at d_model 128: PEER (h 4, k 8) at
   N = 65,536 / 262,144 / 1,048,576 (dense and row-sparse table gradients), PKM, and FHME,
   against the dense GeGLU x4 of the model and a GeGLU of equal *active* parameters (the
   parameters one token's computation touches: query, every sub-key, the selected rows).
2. A whole training step (forward, backward, optimizer) of the presets, and its peak
   memory (each in a fresh process: peak RSS), including ``peer`` at N = 262,144 and
   N = 1,048,576.
3. Batch-1 decoding with the KV cache: milliseconds per token (median of 3 interleaved
   rounds of 200 tokens), ``peer`` and ``fhme`` vs ``dense``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fractalformer.config import build_config
from fractalformer.models import build_model
from fractalformer.nn import GeGLU, Nesting
from fractalformer.nn.product_keys import PEER, PKM
from fractalformer.train.losses import training_loss
from fractalformer.train.optim import clipped_params, make_optimizer
from harness import machine, script_parser, timeit

D, TOKENS = 128, (16, 256)


def active(n: int, heads: int = 4, topk: int = 8, key_dim: int = 128, rows: int = 2) -> int:
    """Parameters one token touches in a product-key layer."""
    return D * heads * key_dim + heads * math.isqrt(n) * key_dim + heads * topk * rows * D


def layer_ms(layer: torch.nn.Module, repeat: int) -> float:
    x = torch.randn(1, *TOKENS, D, requires_grad=True)

    def step() -> None:
        layer(x, 0).sum().backward()
        for p in layer.parameters():
            p.grad = None

    return timeit(step, repeat) * 1000


def geglu(hidden: int) -> GeGLU:
    g = GeGLU(Nesting(), D, hidden, True)
    for p in g.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return g


def layers(repeat: int) -> list[dict]:
    dense = layer_ms(geglu(4 * D), repeat)
    rows = [{"layer": "dense GeGLU x4", "active": 3 * D * 4 * D, "ms": dense}]
    cases = [("PEER N=65,536", PEER(D, 65536, 4, 8, 128), 65536, 2),
             ("PEER N=65,536 sparse grads", PEER(D, 65536, 4, 8, 128, sparse=True), 65536, 2),
             ("PKM N=65,536", PKM(D, 65536, 4, 8, 128), 65536, 1),
             ("PEER N=262,144", PEER(D, 262144, 4, 8, 128), 262144, 2),
             ("PEER N=262,144 sparse grads", PEER(D, 262144, 4, 8, 128, sparse=True), 262144, 2),
             ("PEER N=1,048,576", PEER(D, 1 << 20, 4, 8, 128), 1 << 20, 2),
             ("PEER N=1,048,576 sparse grads", PEER(D, 1 << 20, 4, 8, 128, sparse=True), 1 << 20, 2)]
    for name, layer, n, per_row in cases:
        act = active(n, rows=per_row)
        equal = layer_ms(geglu(max(1, round(act / (3 * D)))), repeat)
        ms = layer_ms(layer, repeat)
        rows.append({"layer": name, "active": act, "ms": ms, "equal_dense_ms": equal,
                     "vs_equal_dense": ms / equal, "vs_dense_x4": ms / dense})
        del layer
    return rows


def step_child(preset: str, sets: list[str], repeat: int) -> None:
    """Runs in a fresh process: one training step's time and the process's peak RSS."""
    torch.manual_seed(0)
    cfg = build_config(preset, None, sets)
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg)
    clip = clipped_params(model, cfg)
    x = torch.randint(0, cfg.model.vocab_size, TOKENS)

    def step() -> None:
        loss, _ = training_loss(model, model(x), x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = timeit(step, repeat, warmup=1) * 1000
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak over exec)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024 / 1024
    print(json.dumps({"ms": ms, "peak_gb": peak, "params": model.num_params()}))


def steps(repeat: int) -> list[dict]:
    cases = [("dense", "dense", []), ("peer (N=65,536)", "peer", []), ("pkm (N=65,536)", "pkm", []),
             ("fhme (N=16,384, depth 3)", "fhme", []),
             ("peer N=262,144", "peer", ["n_experts=262144"]),
             ("peer N=262,144 sparse", "peer", ["n_experts=262144", "moe_sparse=true"]),
             ("peer N=1,048,576 sparse, layer 1 only", "peer",
              ["n_experts=1048576", "moe_sparse=true", "moe_layers=1"])]
    rows = []
    for name, preset, sets in cases:
        # a fresh interpreter per case, run as this module from the repository root
        out = subprocess.run([sys.executable, "-m", "bench.bench_moe", "--child", preset, *sets, "--repeat",
                              str(repeat)], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout
        rows.append({"model": name, **json.loads(out.strip().splitlines()[-1])})
    base = rows[0]["ms"]
    for r in rows:
        r["vs_dense"] = r["ms"] / base
    return rows


def decode(tokens: int = 200, rounds: int = 3) -> list[dict]:
    """Median ms/token over ``rounds``, the models interleaved so drift hits them alike."""
    from fractalformer.generate import generate

    models = {}
    for preset in ("dense", "peer", "fhme"):
        torch.manual_seed(0)
        models[preset] = build_model(build_config(preset).model).eval()
    times: dict[str, list[float]] = {p: [] for p in models}
    for _ in range(rounds):
        for preset, model in models.items():
            t0 = time.perf_counter()
            n = sum(1 for _ in generate(model, [0], tokens, 0.0, None, None, 0))
            times[preset].append((time.perf_counter() - t0) / n * 1000)
    rows = [{"model": p, "ms_per_token": statistics.median(t)} for p, t in times.items()]
    for r in rows:
        r["vs_dense"] = r["ms_per_token"] / rows[0]["ms_per_token"]
    return rows


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--only", nargs="+", choices=["layers", "steps", "decode"],
                    help="measure only these parts")
    a = ap.parse_args()
    if a.child:
        step_child(a.child[0], a.child[1:], a.repeat)
        return
    print(f"Machine: {machine()}\n")
    parts = a.only or ["layers", "steps", "decode"]
    lay = layers(a.repeat) if "layers" in parts else []
    stp = steps(max(2, a.repeat // 2)) if "steps" in parts else []
    dec = decode() if "decode" in parts else []
    if lay:
        print("| layer (fwd+bwd, 4,096 tokens) | active params | ms | dense of equal active, ms | ratio | "
              "vs GeGLU x4 |\n|---|---|---|---|---|---|")
    for r in lay:
        print(f"| {r['layer']} | {r['active']:,} | {r['ms']:.1f} | {r.get('equal_dense_ms', r['ms']):.1f} | "
              f"{r.get('vs_equal_dense', 1.0):.2f}x | {r.get('vs_dense_x4', 1.0):.2f}x |")
    if stp:
        print("\n| training step (16 x 256 tokens) | params | ms | vs dense | peak RSS |\n"
              "|---|---|---|---|---|")
    for r in stp:
        print(f"| {r['model']} | {r['params']:,} | {r['ms']:.0f} | {r['vs_dense']:.2f}x | "
              f"{r['peak_gb']:.2f} GB |")
    if dec:
        print("\n| batch-1 decode (KV cache) | ms/token | vs dense |\n|---|---|---|")
    for r in dec:
        print(f"| {r['model']} | {r['ms_per_token']:.2f} | {r['vs_dense']:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps({"layers": lay, "steps": stp, "decode": dec}, indent=1))


if __name__ == "__main__":
    main()
