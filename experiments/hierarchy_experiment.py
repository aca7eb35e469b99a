"""Imposed and emergent hierarchical embeddings vs a plain Matryoshka (MRL) head.

    python -m experiments.hierarchy_experiment [--steps 1500] [--out runs/hierarchy]

Three runs of the ``matryoshka`` preset (the seed matryoshkaGPT: char tokens, d 32, an
MRL head at widths 32/16/8/4/2) with the same seed and batches: plain, imposed (the
seed's categories, ``groups=seed``) and emergent (DBSCAN re-clustering every 250 steps).
Each run is analysed (``fractalformer analyze``); writes
``docs/results/hierarchy_experiment_<steps>.md`` (the tables of docs/hierarchy.md) with the
BPC of every width, cos('a','A') and cos('a','i') per width, and the adjusted Rand index
of the emergent clusters against the imposed categories.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fractalformer.analysis.report import analyze
from fractalformer.cli import main as cli
from harness import machine, script_parser

VARIANTS = {"plain": [], "imposed": ["groups=seed"], "emergent": ["emergent_every=250"]}


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default="runs/hierarchy")
    ap.add_argument("--docs", default="docs/results", help="folder of the result tables")
    a = ap.parse_args()
    results = {}
    for name, sets in VARIANTS.items():
        run = Path(a.out) / f"{name}-{a.steps}"
        if not (run / "analysis" / "summary.json").is_file():
            t0 = time.perf_counter()
            if not (run / "config.json").exists():
                args = ["train", "--preset", "matryoshka", "--quiet", "--max-steps", str(a.steps), "--out",
                        str(run), "--set", "sample_tokens=0"] + [x for s in sets for x in ("--set", s)]
                assert cli(args) == 0
            (run / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}")
            analyze(run)
        results[name] = json.loads((run / "analysis" / "summary.json").read_text())
        print(f"{name}: done", flush=True)
    widths = [r["width"] for r in results["plain"]["rows"]]
    lines = [f"# Hierarchical embeddings ({a.steps} steps)", "", f"Machine: {machine()}.", "",
             f"Command: `python -m experiments.hierarchy_experiment --steps {a.steps}`. Preset `matryoshka`",
             "(seed matryoshkaGPT: char tokens, d 32, 4 layers, 4 heads, MRL head at widths 32/16/8/4/2,",
             f"batch 32 x 128), {a.steps} steps, same seed and batches for all three runs. BPC = bits per",
             "character on the full validation split (plain cross-entropy, whatever the training loss).", "",
             "How it works: at a width with groups the training target is spread uniformly over the",
             "target token's group (`fractalformer/hierarchy.py`; plain cross-entropy for singletons).",
             "`groups=seed` imposes the seed's categories by width, smallest first: symbols vs letters;",
             "end-of-sentence / mid-sentence / upper / lower; spaces / vowels (with y) / consonants; the 26",
             "case pairs; the largest width keeps the identity. For bpe128 a merged token takes the class",
             "of its first character and its case pair is its lower-cased text (shipped as",
             "`fractalformer/assets/groups_char.json` and `groups_bpe128.json`; `groups=FILE` takes any",
             "such file). `emergent_every=N` re-clusters the embedding columns each width owns every N",
             "steps (DBSCAN, cosine, eps 0.1, min 3; `cluster_method=agglomerative` as an option) and",
             "trains on those clusters; every clustering is logged to the run's `clusters.json`.",
             "`fractalformer analyze RUN` draws the heatmaps, dendrogram and tables behind these figures",
             "(`RUN/analysis/report.html`).", "",
             "## BPC per width", "", "| run | " + " | ".join(f"w {w}" for w in widths) + " |",
             "|---|" + "---|" * len(widths)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row['val_bpc']:.4f}" for row in r["rows"]) + " |")
    base = results["plain"]["rows"]
    for name in ("imposed", "emergent"):
        pairs = zip(results[name]["rows"], base, strict=True)
        cost = [(row["val_bpc"] - b["val_bpc"]) / b["val_bpc"] * 100 for row, b in pairs]
        lines.append(f"| {name} vs plain | " + " | ".join(f"{c:+.1f}%" for c in cost) + " |")
    header = "| run | pair | " + " | ".join(f"w {w}" for w in widths) + " |"
    lines += ["", "## Cosine similarity per width", "", header, "|---|---|" + "---|" * len(widths)]
    for name, r in results.items():
        for pair, d in r["cosines"].items():
            lines.append(f"| {name} | {pair} | " + " | ".join(f"{d[str(w)]:+.3f}" for w in widths) + " |")
    ari = results["emergent"]["emergent_ari"]
    lines += ["", "## Emergent clusters vs imposed categories", "",
              "Adjusted Rand index of the last DBSCAN clustering (eps 0.1, min 3, cosine) against the seed's",
              "imposed categories at the same width (1 = identical partition, 0 = chance):", "",
              "| width | ARI |", "|---|---|"]
    lines += [f"| {w} | {v:.3f} |" for w, v in sorted(ari.items(), key=lambda kv: int(kv[0]))]
    (Path(a.docs) / f"hierarchy_experiment_{a.steps}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
