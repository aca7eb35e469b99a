"""Speed of the chunking study's trained models: a training step and decoding, in one run.

    python -m bench.bench_chunking [--root runs/chunking/steps1400] [--only NAME ...]
                                   [--tokens 200] [--repeat 3] [--rounds 3] [--json FILE]

For every finished row of ``python -m experiments.chunking`` under ``--root`` (the trained
models: with a variable chunking, the chunks a model makes set what its step costs):

* Train: one training step (forward, backward, no optimizer) on the row's first batch of
  its own training data, as a ratio to ``dense``'s step (``--baseline``). Dense's
  1,400-step wall time buys ``1400 / ratio`` steps of the row: what "equal wall time" means.
* Decode: greedy tokens/s with KV caches at batch 1 and 16 (16 validation units as the
  prompt, then ``--tokens`` single-unit steps; a byte model's boundaries decided online),
  as a ratio to each flat byte model (``dense_byte``, ``dense_byte_l2``).

Rows run interleaved, ``--rounds`` times (medians), so the machine's drift hits all alike.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

import fractalformer
from bench.bench_concept import decode
from fractalformer.data.corpus import as_tensor, batch_generator, get_batch
from fractalformer.runs import prepare_data
from fractalformer.train.losses import training_loss
from harness import machine, script_parser, timeit

FLAT = ("dense_byte", "dense_byte_l2")  # the flat byte transformers decoding is compared with


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    loss, _ = training_loss(model, model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--root", default="runs/chunking/steps1400")
    ap.add_argument("--only", nargs="*", help="these rows (default: every finished one)")
    ap.add_argument("--baseline", default="dense", help="the row training steps are compared with")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args()
    root = Path(a.root)
    names = a.only or sorted(p.parent.name for p in root.glob("*/eval.json") if "." not in p.parent.name)
    print(f"machine: {machine()}")
    rows = {}
    for name in names:
        trained = fractalformer.load(root / name)
        cfg = trained.run_config
        _, corpus = prepare_data(cfg)
        x, y = get_batch(corpus.train, cfg.train.batch_size, cfg.model.block_size,
                         batch_generator(cfg.train.seed, 0))
        prompt = as_tensor(corpus.val[: 16 * 16]).view(16, 16)
        rows[name] = (trained.model, x, y, prompt)
    times: dict[str, dict[str, list[float]]] = {n: {"train": [], "1": [], "16": []} for n in rows}
    for _ in range(a.rounds):
        for name, (model, x, y, prompt) in rows.items():
            model.train()
            times[name]["train"].append(timeit(lambda m=model, x=x, y=y: train_step(m, x, y), a.repeat, 1))
            model.eval()
            for batch in (1, 16):
                times[name][str(batch)].append(
                    timeit(lambda m=model, p=prompt[:batch]: decode(m, p, a.tokens), a.repeat, 1))
    out: dict = {"machine": machine(), "root": str(root), "tokens": a.tokens, "rows": {}}
    base = statistics.median(times[a.baseline]["train"]) if a.baseline in times else None
    for name, t in times.items():
        step = statistics.median(t["train"])
        row = {"train_s": step, "train_vs_baseline": step / base if base else None,
               **{f"decode{b}_tok_s": int(b) * a.tokens / statistics.median(t[b]) for b in ("1", "16")}}
        for flat in FLAT:
            if flat in times and flat != name:
                for b in ("1", "16"):
                    ratios = sorted(f / c for f, c in zip(times[flat][b], t[b], strict=True))
                    row[f"decode{b}_vs_{flat}"] = statistics.median(ratios)
        out["rows"][name] = row
        vs = " | ".join(f"{k.removeprefix('decode')} {v:.2f}x" for k, v in row.items()
                        if "_vs_dense_byte" in k)
        print(f"{name:>14}: train {step:.3f} s ({row['train_vs_baseline'] or 0:.2f}x {a.baseline}) | decode "
              f"{row['decode1_tok_s']:7.1f} / {row['decode16_tok_s']:7.1f} tok/s at batch 1 / 16 | {vs}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
