"""Byte models that make their own tokens: ``concept-byte`` with each chunking, at equal FLOPs.

    python -m experiments.chunking [--steps 1400] [--out runs/chunking] [--only NAME ...] [--code]

Every row trains on the shipped TinyShakespeare with the dense reference's schedule (AdamW
3e-3 -> 3e-4 cosine, warmup 100) and units per step (16 x 256 bpe128 tokens or 8 x 512
bytes). ``dense`` (the bpe128 reference) and ``dense_byte`` (the same model on bytes) train
``--steps`` steps; every other row trains, on its own full schedule, as many steps as spend
``dense``'s training FLOPs at the cost of its preset with fixed chunks (FLOPs of one step -
forward and backward - counted by torch's FlopCounterMode on a real training batch). A new
model's variable chunks are not those it learns, so the table gives the FLOPs of the
*trained* model's step and the total they make. The text is ASCII: bits per character =
bits per byte for every row.

For each chunking the table gives the mean chunk length and the share of one-byte chunks
on the first 64 validation windows (``ConceptGPT.boundaries``). Wall time is the trainer's
own; training steps per second are measured apart on a quiet machine
(``python -m bench.bench_concept``), so only the FLOPs columns are exact here.
Results: ``<out>/steps<N>/<name>/eval.json``; table ``docs/results/chunking_<N>.md`` and ``.json``.

``--code``: the same rows on this Python's standard library sources, prepared (once, into
``data/``) by ``fractalformer prepare :stdlib --split files`` with the byte tokenizer and,
for ``dense``, with ``bpe:4096`` (bpe128's alphabet is TinyShakespeare's); the dense row's
bits per character are converted per byte with the validation files' characters per
byte. Runs go to ``<out>/steps<N>-code``, the table to ``chunking_<N>_code``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import fractalformer
from experiments.concept_experiment import at
from fractalformer.analysis.chunks import chunk_texts, plot_boundaries
from fractalformer.config import RunConfig, build_config
from fractalformer.data.corpus import as_tensor
from fractalformer.data.prepared import STDLIB, is_prepared, prepare, split_files
from fractalformer.io import read_json
from fractalformer.models.concept import ConceptGPT
from fractalformer.runs import prepare_data
from harness import (
    cached_result,
    data_sets,
    experiment_parser,
    finished,
    machine,
    read_metrics,
    step_flops,
    timed_train,
    write_tables,
)

BYTE = ["tokenizer=byte", "vocab_size=256", "block_size=512", "batch_size=8"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense", []),  # bpe128 tokens: the reference every other row spends the FLOPs of
    "dense_byte": ("dense", BYTE),  # the same 4 blocks on bytes
    "dense_byte_l2": ("dense", [*BYTE, "n_layer=2"]),  # as shallow as concept-byte
    "fixed": ("concept-byte", []),  # concepts of 4, 16, 64 bytes
    "space": ("concept-byte", ["chunking=space"]),  # SpaceByte's rule
    "entropy": ("concept-byte", ["chunking=entropy"]),  # BLT's entropy patches
    "learned": ("concept-byte", ["chunking=learned"]),  # H-Net's dynamic chunking
}
FULL = ("dense", "dense_byte")  # the rows that train --steps steps
WINDOWS = 64  # validation windows the chunk statistics are taken on
LONGEST = 16  # chunk lengths histogrammed one by one up to this


CODE = {"byte": Path("data/stdlib-byte"), "bpe:4096": Path("data/stdlib-bpe4096")}  # --code's corpora


def code_data(tokenizer: str) -> list[str]:
    """The config keys that train on the standard library corpus of ``tokenizer`` (prepared
    on first use)."""
    folder = CODE[tokenizer]
    if not (folder / "manifest.json").is_file():
        prepare([STDLIB], tokenizer, folder, split="files", progress=False)
    return data_sets(folder)


def config(name: str, steps: int, code: bool = False) -> RunConfig:
    preset, sets = VARIANTS[name]
    if code:
        sets = [*sets, *code_data("byte" if name != "dense" else "bpe:4096")]
    return build_config(preset, None, [*sets, f"max_steps={steps}", "warmup_steps=100", "sample_tokens=0",
                                       "eval_every=100", f"ckpt_every={steps}"])


def per_byte(r: dict) -> float:
    """Validation bits per byte of a result (a row scored per character: its bits per
    character times the validation text's characters per byte)."""
    return r["row"]["val_bpc"] * (r.get("chars_per_byte", 1.0) if r["row"].get("unit") == "char" else 1.0)


def chars_per_byte(cfg: RunConfig) -> float:
    """Characters per byte of the validation text of a prepared corpus split by files (1 otherwise)."""
    if not cfg.train.data or not is_prepared(cfg.train.data):
        return 1.0
    m = read_json(Path(cfg.train.data) / "manifest.json")
    if m.get("split") != "files":
        return 1.0
    files = [Path(f["path"]) for f in m["files"]]
    val = split_files(sorted(files))[1]
    return sum(len(f.read_text(encoding="utf-8")) for f in val) / sum(f.stat().st_size for f in val)


def chunk_stats(folder: Path) -> dict:
    """Mean chunk length, the share of one-unit chunks and the histogram of lengths (1 ..
    :data:`LONGEST`, longer in the last bin) on the first validation windows, and the
    first window's chunks as text."""
    trained = fractalformer.load(folder)
    model, cfg = trained.model, trained.run_config
    if not isinstance(model, ConceptGPT):
        return {}
    _, corpus = prepare_data(cfg)
    t = cfg.model.block_size
    val = as_tensor(corpus.val[: WINDOWS * t]).view(-1, t)
    starts = model.boundaries(val)
    lengths = torch.tensor([b - a for row in starts for a, b in itertools.pairwise(
        [*row.nonzero().flatten().tolist(), t])])
    return {"mean_chunk": float(lengths.float().mean()), "one_unit": float((lengths == 1).float().mean()),
            "histogram": torch.bincount(lengths.clamp(max=LONGEST), minlength=LONGEST + 1)[1:].tolist(),
            "stretch": chunk_texts(starts[:1], val[:1], trained.tokenizer)[0]}


def plot(results: dict[str, dict], docs: Path, suffix: str = "") -> None:
    """docs/chunk_boundaries<suffix>.png (each chunking on the same validation text) and
    docs/chunk_lengths<suffix>.png (their chunk-length distributions)."""
    rows = {name: r for name, r in results.items() if "stretch" in r}
    if not rows:
        return
    plot_boundaries({f"{name} (mean {r['mean_chunk']:.2f} bytes)": r["stretch"] for name, r in rows.items()},
                    docs / f"chunk_boundaries{suffix}.png")
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for name, r in rows.items():
        h = torch.tensor(r["histogram"], dtype=torch.float)
        ax.plot(range(1, LONGEST + 1), (h / h.sum()).tolist(), marker="o", ms=3, label=name)
    ax.set_xlabel(f"chunk length in bytes ({LONGEST}: {LONGEST} or longer)")
    ax.set_ylabel("share of chunks")
    ax.set_title("Level-1 chunk lengths on validation text")
    ax.legend()
    fig.tight_layout()
    fig.savefig(docs / f"chunk_lengths{suffix}.png", dpi=110)
    plt.close(fig)


def run_one(name: str, steps: int, root: Path, budget: float | None, code: bool = False,
            rematch: bool = False) -> dict:
    """Train ``name`` for ``steps`` steps, or for the steps that spend ``budget`` FLOPs at the
    cost of a new model of its preset with fixed chunks (a new model's variable chunks are
    not yet those it learns); the table gives the FLOPs of the trained model's step.
    ``rematch``: a finished row whose total is more than 2% off ``budget`` trains again, for
    the steps its trained model's step cost buys (the first run is kept as ``<name>.first``)."""
    folder = root / name
    probe = config("fixed" if VARIANTS[name][0] == "concept-byte" else name, steps, code)
    done = folder / "eval.json"
    first = None
    if rematch and budget is not None and done.is_file():
        first = json.loads(done.read_text())
        if abs(first["step_flops"] * first["steps"] / budget - 1) <= 0.02:
            return first
        folder.rename(folder.with_name(f"{name}.first"))
        n = round(budget / first["step_flops"])
    else:
        n = steps if budget is None else max(100, round(budget / step_flops(probe)))

    def compute() -> dict:
        cfg = config(name, n, code)
        res, wall = timed_train(cfg, folder)
        flops = step_flops(cfg, folder)
        metrics = read_metrics(folder)
        curve = [(int(r["step"]), float(r["elapsed_s"]), float(r["val_loss"]), float(r["val_bpc"]))
                 for r in metrics if r.get("val_loss")]
        return {"name": name, "sets": VARIANTS[name][1], "steps": n, "wall_s": wall, "step_flops": flops,
                "params": fractalformer.load(folder).model.num_params(), "val_curve": curve,
                "row": res.final[0].to_json(), "chars_per_byte": chars_per_byte(cfg), **chunk_stats(folder),
                **({"first_try": {k: first[k] for k in ("steps", "step_flops", "row")}} if first else {})}

    return cached_result(folder, compute)


def report(results: dict[str, dict], steps: int, code: bool = False, bench: dict | None = None) -> str:
    ref = results.get("dense")
    tokens = "bpe:4096" if code else "bpe128"
    on = ("this Python's standard library sources (`fractalformer prepare :stdlib --split files`)" if code
          else "TinyShakespeare")
    lines = [f"# Chunkings of concept-byte at the FLOPs of {steps} dense {tokens} steps, on {on}", "",
             f"Machine: {machine()}. Command: `python -m experiments.chunking --steps {steps}"
             f"{' --code' if code else ''}`. Bits/byte on the full validation split (the dense {tokens} "
             "row: bits/char times the validation text's characters per byte). Each row but "
             "`dense` and `dense_byte` trains on its own full schedule for as many steps as spend "
             "`dense`'s training FLOPs at the step cost of fixed chunks; FLOPs/step is the trained "
             "model's (its own chunks), total = FLOPs/step x steps; a row more than 2% off dense's total "
             "trains again for the steps its own step cost buys (`--rematch`). Mean chunk: bytes per level-1 "
             "concept on the first "
             f"{WINDOWS} validation windows; 1-byte: the share of chunks one byte long.", "",
             "| run | config | params | FLOPs/step | steps | total FLOPs | val nats/unit | bits/byte | "
             f"vs dense {tokens} | mean chunk | 1-byte |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        r = results.get(name)
        if r is None:
            continue
        row = r["row"]
        vs = (f"{100 * (per_byte(r) / per_byte(ref) - 1):+.1f}%"
              if ref is not None and r is not ref else "-")
        chunk = f"{r['mean_chunk']:.2f}" if "mean_chunk" in r else "-"
        one = f"{100 * r['one_unit']:.0f}%" if "one_unit" in r else "-"
        lines.append(f"| {name} | {VARIANTS[name][0]} {' '.join(r['sets'])} | {r['params']:,} | "
                     f"{r['step_flops'] / 1e9:.1f} G | {r['steps']} | "
                     f"{r['step_flops'] * r['steps'] / 1e12:.1f} T | "
                     f"{row['val_loss']:.4f} | {per_byte(r):.4f} | {vs} | {chunk} | {one} |")
    if bench and ref is not None:
        lines += wall_table(results, bench, ref)
    return "\n".join(lines) + "\n"


def wall_table(results: dict[str, dict], bench: dict, ref: dict) -> list[str]:
    """Equal wall time from a quiet benchmark of the trained models' steps
    (``python -m bench.bench_chunking --json``): the steps each row could train in dense's
    wall time, and its own validation curve there (mid-schedule where it trained more
    steps, so the figure favours dense)."""
    rows = bench["rows"]
    end = ref["val_curve"][-1][3] * ref.get("chars_per_byte", 1.0)
    lines = ["", f"Equal wall time, from `python -m bench.bench_chunking` ({bench['machine']}): each row's "
             "training step against dense's (the median of interleaved rounds), the steps that buys in "
             f"dense's {ref['steps']} steps, and bits/byte on the curves' fixed validation batches (not the "
             f"full split): dense ends at {end:.4f}.", "",
             "| run | step vs dense | steps in dense's wall time | steps trained | bits/byte there (curve) |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        if name not in rows or r is ref or not rows[name].get("train_vs_baseline"):
            continue
        ratio = rows[name]["train_vs_baseline"]
        n = ref["steps"] / ratio
        there = at(r["val_curve"], min(n, r["steps"]), 0)
        cell = f"{there * r.get('chars_per_byte', 1.0):.4f}" if there is not None else "-"
        lines.append(f"| {name} | {ratio:.2f}x | {n:,.0f} | {r['steps']} | {cell}"
                     f"{' (its end: it trained fewer)' if n > r['steps'] else ''} |")
    return lines


def main() -> None:
    ap = experiment_parser(__doc__, 1400, "runs/chunking", list(VARIANTS))
    ap.add_argument("--code", action="store_true", help="on the standard library's sources (see above)")
    ap.add_argument("--bench", help="a `python -m bench.bench_chunking --json` file: add the equal-wall-time "
                                    "table")
    ap.add_argument("--rematch", action="store_true",
                    help="train again the rows whose total FLOPs are more than 2%% off dense's")
    a = ap.parse_args()
    suffix = "-code" if a.code else ""
    root = Path(a.out) / f"steps{a.steps}{suffix}"
    budget = None
    for name in [] if a.report else a.only or VARIANTS:
        if name not in FULL and budget is None:
            budget = step_flops(config("dense", a.steps, a.code)) * a.steps
        print(f"== {name}", flush=True)
        r = run_one(name, a.steps, root, None if name in FULL else budget, a.code, a.rematch)
        print(f"   {r['steps']} steps, {r['wall_s']:.0f} s; bits/byte {r['row']['val_bpc']:.4f}", flush=True)
    results = finished(root, VARIANTS)
    write_tables(Path(a.docs) / f"chunking_{a.steps}{suffix.replace('-', '_')}", results,
                 report(results, a.steps, a.code, json.loads(Path(a.bench).read_text()) if a.bench else None))
    plot(results, Path(a.docs).parent, suffix.replace("-", "_"))


if __name__ == "__main__":
    main()
