"""The 10M-parameter preset trained on a prepared multi-megabyte corpus: tokens/s and MFU.

    python -m bench.bench_10m [--data PATH ...] [--mb 8] [--steps 30] [--set key=value ...]
    python -m bench.bench_10m --set device=cuda --set dtype=bfloat16 --set compile=true --steps 300  # a GPU

Without --data the corpus is the Python standard library's ``.py`` files (sorted, the
first ``--mb`` megabytes): real multi-megabyte text that every machine has. It is
prepared once (``fractalformer prepare``, bpe:4096, cached under the system temp folder)
and the ``10m`` preset trains on it through the ordinary trainer. Printed, all measured
in this run:

* tokens/s of training steps after the first ``--skip`` (compilation, allocator warm-up),
  from the trainer's own metrics.csv;
* FLOPs of one training step (forward + backward of every sub-model), counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the real batch shape;
* the matmul peak of this device: the best of several square matmuls in the training
  dtype;
* MFU = achieved FLOP/s (step FLOPs x steps/s) / that peak.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fractalformer.cli import main as cli
from fractalformer.config import RunConfig, build_config
from fractalformer.data.corpus import Ids, batch_generator, training_batch
from fractalformer.data.prepared import load_prepared
from fractalformer.device import pick_device
from fractalformer.models import build_model
from fractalformer.train import make_optimizer
from fractalformer.train.losses import training_loss
from harness import machine, script_parser


def default_files(mb: float) -> list[str]:
    files, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in p.parts or not p.is_file():
            continue
        files.append(str(p))
        total += p.stat().st_size
        if total >= mb * 2**20:
            break
    return files


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeat: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeat + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_flops(cfg: RunConfig, device: str, autocast_dtype: torch.dtype | None, ids: Ids) -> int:
    """FLOPs of one training step (forward and backward), counted on the real batch."""
    model = build_model(cfg.model).to(device)
    opt = make_optimizer(model, cfg)
    x, y = training_batch(ids, cfg.train.batch_size, cfg.model.block_size, batch_generator(0, 0),
                          cfg.train.routing, model.nest.counts())
    counter = FlopCounterMode(display=False)
    ctx = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with counter, ctx:
        loss, _ = training_loss(model, model(x.to(device)), y.to(device))
        loss.backward()
    opt.zero_grad()
    return counter.get_total_flops()


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--data", nargs="+", help="text files or folders (default: the stdlib's .py files)")
    ap.add_argument("--mb", type=float, default=8.0, help="megabytes of the default corpus")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of tokens/s")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    files = a.data or default_files(a.mb)
    key = hashlib.sha256("\n".join(files).encode()).hexdigest()[:12]
    prepared = Path(tempfile.gettempdir()) / f"fractalformer-bench-{key}"
    if not prepared.exists():
        assert cli(["prepare", *files, "--tokenizer", "bpe:4096", "--out", str(prepared), "--quiet",
                    "--unknown", "replace"]) == 0
    m, tok, ids = load_prepared(prepared)
    sets = [f"data={prepared}", f"vocab_size={tok.vocab_size}", f"max_steps={a.steps}",
            f"eval_every={a.steps}", f"ckpt_every={a.steps}", f"warmup_steps={min(100, a.steps)}",
            "sample_tokens=0", *a.set]
    cfg = build_config("10m", None, sets)
    device = pick_device(cfg.train.device)
    bf16 = cfg.train.dtype == "bfloat16" or (device == "cuda" and cfg.train.dtype == "auto")
    print(machine())
    print(f"corpus: {len(m['files'])} files, {m['bytes'] / 2**20:.1f} MiB -> {m['count']:,} bpe:4096 tokens "
          f"({prepared})")
    flops = step_flops(cfg, device, torch.bfloat16 if bf16 else None, ids[: m["train_count"]])
    with tempfile.TemporaryDirectory() as tmp:
        # --stop-after at the last step: the fixed validation batches, not the whole split
        assert cli(["train", "--preset", "10m", "--quiet", "--out", f"{tmp}/run", "--stop-after",
                    str(a.steps), *[x for s in sets for x in ("--set", s)]]) == 0
        with open(f"{tmp}/run/metrics.csv") as f:
            rows = list(csv.DictReader(f))
    first, last = rows[a.skip - 1], rows[-1]
    steps = int(last["step"]) - int(first["step"])
    seconds = float(last["elapsed_s"]) - float(first["elapsed_s"])
    tokens_s = (int(last["tokens"]) - int(first["tokens"])) / seconds
    peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32, 8192 if device == "cuda" else 2048)
    achieved = flops * steps / seconds
    params = build_model(cfg.model).num_params()
    print(f"model: 10m preset, {params:,} parameters, batch {cfg.train.batch_size} x {cfg.model.block_size}, "
          f"{'bf16' if bf16 else 'fp32'}{' compiled' if cfg.train.compile else ''} on {device}")
    print(f"training: {tokens_s:,.0f} tokens/s over steps {first['step']}..{last['step']} "
          f"({seconds / steps * 1000:.0f} ms/step); train loss {float(rows[0]['train_loss']):.3f} -> "
          f"{float(last['train_loss']):.3f}, val {float(last['val_loss']):.3f} nats/token = "
          f"{float(last['val_bpc']):.3f} bits/char")
    print(f"FLOPs per step {flops / 1e9:.2f} G (FlopCounterMode) | achieved {achieved / 1e9:.2f} GFLOP/s | "
          f"matmul peak {peak / 1e9:.2f} GFLOP/s | MFU {achieved / peak:.1%}")


if __name__ == "__main__":
    main()
