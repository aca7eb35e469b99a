"""Effective context with the batch held fixed: does reading 1,024 tokens beat reading 256?

    python -m experiments.reach_experiment [--steps 300] [--only NAME ...] [--out runs/reach] [--data DIR]

Every run trains on 16 windows a step and scores the *last 256 tokens* of each, so the
tokens that carry the loss, the places in the text a step sees and the schedule
(AdamW 3e-3 -> 3e-4 cosine, warmup 100, the trainer's optimizer and clipping) are the same
for every row; only what the model may read before those 256 tokens changes:

* ``dense256`` / ``shared256``: the dense reference and the shared-weights ``concept``
  preset on 256-token windows (the tables' baselines).
* ``dense1024``: the dense reference with full attention over 1,024 tokens (4x the
  token-level work): the reach any model could exploit, at its plainest.
* ``dense256_l7``: the dense reference with 7 blocks, about ``reach1024``'s step time on a
  ``bpe:4096`` corpus (the dense model a reach must beat at equal step time).
* ``reach1024`` / ``reach4096``: the ``concept`` preset over 1,024 (4,096) tokens at about
  the 256-token cost. The
  token level and the first concept level run on the last 256-token chunk only (tokens
  read their chunk's plans), the top level (one concept per 16 tokens) runs over all 64
  concepts of the 1,024 tokens, and the chunk's first level reads those plans: the
  Block-Transformer / MegaByte split, with the chunk grid fixed to the
  window's end.

Validation: the whole split in steps of 256 tokens, each scored once with ``ctx - 256``
tokens before it (the 256-token runs: plain non-overlapping windows); every run skips the
same first tokens, which the longest reach needs as context (768 on TinyShakespeare,
3,840 on a ``--data`` corpus). Writes ``docs/results/reach_experiment_<steps>[_<DIR's name>].md``
and ``.json``; ``--data DIR`` trains on a prepared corpus (e.g. the standard library's sources).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fractalformer.config import build_config
from fractalformer.data.corpus import batch_generator, get_batch
from fractalformer.models import build_model
from fractalformer.models.concept import ConceptCache, ConceptGPT
from fractalformer.runs import prepare_data
from fractalformer.train.losses import concept_regression, family_loss
from fractalformer.train.optim import lr_at, make_optimizer
from harness import data_sets, machine, script_parser

CHUNK = 256
VARIANTS: dict[str, tuple[str, int, list[str]]] = {
    "dense256": ("dense", 256, []), "shared256": ("concept", 256, []), "dense1024": ("dense", 1024, []),
    "reach1024": ("concept", 1024, []), "reach4096": ("concept", 4096, []),
    # about reach1024's step time on a bpe:4096 corpus: 7 blocks instead of 4
    "dense256_l7": ("dense", 256, ["n_layer=7"]),
}


def skipped(data: str | None) -> int:
    """Validation tokens every run skips: the context of the longest reach on the corpus
    (TinyShakespeare: 1,024 tokens; a prepared corpus: 4,096) less the scored chunk."""
    return (4096 if data else 1024) - CHUNK


def reach_forward(model: ConceptGPT, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the last ``CHUNK`` tokens (1, B, CHUNK, V) and the concept regression loss,
    with every level but the top one confined to the last chunk (chunk-relative positions)."""
    b, t = idx.shape
    top, span = model.config.concept.levels, model.span
    state = ConceptCache(model, b, False)
    emb = model.embed(idx, 0)
    model.add_units(state, emb, t)
    first = [0] * (top + 1)
    for k in range(top, -1, -1):
        n = t // span[k]
        first[k] = 0 if k == top else n - CHUNK // span[k]
        if k == 0:
            x = emb[:, :, first[0]:]
        else:
            head = [model.start[k - 1].view(1, 1, 1, -1).expand(1, b, 1, -1)] if first[k] == 0 else []
            x = torch.cat([*head, state.units[k][:, :, max(first[k] - 1, 0): n - 1]], 2)
        group = None
        if k < top:  # the plan each position reads, numbered as the level above holds its plans
            group = torch.arange(first[k], n) // model.combo[k] - first[k + 1]
        out = model.run_tier(k, x, first[k], state, group)
        if k > 0:
            state.memory[k - 1].extend(out, model.reader(k - 1), model.read_scale[k - 1], model.depth(k - 1),
                                      model.rotary[0])
    aux = concept_regression(model, model.predict(state, first))
    return model.head({0: out})[0], aux if aux is not None else torch.zeros(())


def logits_and_aux(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reach: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    if reach:
        lg, aux = reach_forward(model, x)
        return lg[0], aux
    lg = model(x, [0])[0][0][:, -CHUNK:]
    aux = family_loss(model, y)
    return lg, aux if aux is not None else torch.zeros(())


def run_one(name: str, steps: int, data: str | None = None) -> dict:
    preset, ctx, extra = VARIANTS[name]
    reach = name.startswith("reach")
    sets = [*extra, f"block_size={ctx}", f"max_steps={steps}", "warmup_steps=100", "batch_size=16",
            *(["concept_share=true"] if preset == "concept" else []), *(data_sets(data) if data else [])]
    cfg = build_config(preset, None, sets)
    _, corpus = prepare_data(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).train()
    opt = make_optimizer(model, cfg)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg) * g.get("lr_scale", 1.0)
        x, y = get_batch(corpus.train, 16, ctx, batch_generator(cfg.train.seed, step))
        lg, aux = logits_and_aux(model, x, y, reach)
        loss = F.cross_entropy(lg.flatten(0, 1).float(), y[:, -CHUNK:].flatten())
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        if step % 50 == 0:
            print(f"   {name} step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    train_s = time.time() - t0
    model.eval()
    val, total, count = corpus.val, 0.0, 0
    with torch.no_grad():
        for s in range(0, len(val) - 1 - CHUNK, CHUNK):  # targets s+1 .. s+CHUNK, each once
            if s < skipped(data):
                continue  # the first windows: too little text before them for the longest reach
            lo = s + CHUNK - ctx
            x = torch.as_tensor(val[lo: s + CHUNK]).long()[None]
            y = torch.as_tensor(val[s + 1: s + CHUNK + 1]).long()
            lg, _ = logits_and_aux(model, x, y[None], reach)
            total += F.cross_entropy(lg[0].float(), y, reduction="sum").item()
            count += CHUNK
    nats = total / count
    return {"name": name, "preset": preset, "ctx": ctx, "steps": steps, "train_s": train_s, "sets": sets,
            "val_nats": nats, "val_bpc": nats / math.log(2) / corpus.val_units_per_token, "tokens": count}


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS))
    ap.add_argument("--out", default="runs/reach")
    ap.add_argument("--docs", default="docs/results", help="folder of the result tables")
    ap.add_argument("--data", help="a prepared corpus folder (default: the shipped TinyShakespeare)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    suffix = f"-{Path(a.data).name}" if a.data else ""
    root = Path(a.out) / f"steps{a.steps}{suffix}"
    for name in a.only or VARIANTS:
        path = root / f"{name}.json"
        if path.exists():
            continue
        print(f"== {name}", flush=True)
        r = run_one(name, a.steps, a.data)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=1))
        print(f"   BPC {r['val_bpc']:.4f} ({r['train_s']:.0f} s)", flush=True)
    rows = [json.loads((root / f"{n}.json").read_text()) for n in VARIANTS if (root / f"{n}.json").exists()]
    on = f" on {Path(a.data).name}" if a.data else ""
    lines = [f"# Effective context at a fixed batch ({a.steps} steps{on})", "",
             f"Machine: {machine()}; one thread per run, other runs on the other core (s/step is rough).", "",
             f"Command: `python -m experiments.reach_experiment --steps {a.steps}"
             f"{f' --data {a.data}' if a.data else ''}`. Every run: 16 windows a "
             "step, loss on the last 256 tokens of each; validation scores the same 256-token steps, "
             f"skipping the first {skipped(a.data):,} tokens. Bits per character (per byte on a byte "
             "corpus).",
             "", "| run | preset | reads | s/step | val nats/token | bits/char |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['preset']} | {r['ctx']} | {r['train_s'] / r['steps']:.2f} | "
              f"{r['val_nats']:.4f} | {r['val_bpc']:.4f} |" for r in rows]
    stem = Path(a.docs) / f"reach_experiment_{a.steps}{suffix.replace('-', '_')}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
