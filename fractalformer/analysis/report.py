"""``fractalformer analyze RUN``: embedding similarity, clusters, losses and consistency.

Writes PNGs and one self-contained ``report.html`` (images inlined) into ``RUN/analysis``:

* cosine-similarity heatmaps of the embedding columns each level's (first) sub-model owns,
  tokens ordered by class (newline, punctuation, upper vowels, upper consonants, lower
  vowels, lower consonants);
* a dendrogram of the full embedding (average linkage, cosine distance);
* the loss curves of every sub-model and the validation table (nats/token, bits/char);
* the consistency of every sub-model with the full model on validation windows: greedy
  top-1 agreement and mean ``sum(min(p, q))`` - the expected acceptance rate of
  speculative decoding with that sub-model as the draft;
* for runs with token groups: cos('a','A') and cos('a','i') per width, and the adjusted
  Rand index of the last emergent clustering against the seed's imposed categories.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from ..hierarchy import groups_to_labels, seed_groups, token_class, token_strings
from .plots import plot_curves


def embedding_slices(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Level -> the (vocab, width) embedding columns its first sub-model owns."""
    emb = model.embed.weight.detach().float().cpu()
    return {lv: emb[:, model.nest.owned(emb.shape[1], lv)[0]] for lv in range(model.nest.levels)}


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.normalize(x, dim=-1)
    return x @ x.T


def pair_cosines(model: torch.nn.Module, pairs: list[tuple[str, str]]) -> dict[str, dict[int, float]]:
    """cos(a, b) at every level width, for each pair whose tokens are in the vocabulary."""
    index = {s: i for i, s in enumerate(token_strings(model.tokenizer))}
    out = {}
    for a, b in pairs:
        if a in index and b in index:
            out[f"{a},{b}"] = {model.level_width(lv): round(float(cosine_matrix(e)[index[a], index[b]]), 4)
                               for lv, e in embedding_slices(model).items()}
    return out


@torch.no_grad()
def consistency(model: torch.nn.Module, windows: torch.Tensor) -> dict[tuple[int, int], dict[str, float]]:
    """Top-1 agreement and mean sum(min(p, q)) of every sub-model with the full model."""
    logits = model.run(windows, model.body_levels())
    p = torch.softmax(logits[0][0].float(), -1)
    out = {}
    for lv, lg in logits.items():
        q = torch.softmax(lg.float(), -1)  # (n, B, T, V)
        for j in range(q.shape[0]):
            out[(lv, j)] = {"top1_agreement": float((q[j].argmax(-1) == p.argmax(-1)).float().mean()),
                            "expected_acceptance": float(torch.minimum(p, q[j]).sum(-1).mean())}
    return out


def emergent_ari(run_dir: Path, model: torch.nn.Module) -> dict[int, float]:
    """Adjusted Rand index of the last clustering at each width vs the seed's categories."""
    from sklearn.metrics import adjusted_rand_score

    path = run_dir / "clusters.json"
    if not path.is_file():
        return {}
    last = json.loads(path.read_text())[-1]
    tok = model.tokenizer
    widths = [model.level_width(lv) for lv in range(model.nest.levels)]
    imposed = seed_groups(tok, widths)
    v = tok.vocab_size
    out = {}
    for w, groups in last["ids"].items():
        if int(w) in imposed:
            found = groups_to_labels(groups, v)
            out[int(w)] = round(float(adjusted_rand_score(groups_to_labels(imposed[int(w)], v), found)), 4)
    return out


def _heatmaps(model: torch.nn.Module, path: Path) -> None:
    strings = token_strings(model.tokenizer)
    order = sorted(range(len(strings)), key=lambda i: (token_class(strings[i]), strings[i]))
    slices = embedding_slices(model)
    fig, axes = plt.subplots(1, len(slices), figsize=(4.2 * len(slices), 4.4), squeeze=False)
    for ax, (lv, e) in zip(axes[0], slices.items(), strict=True):
        sim = cosine_matrix(e)[order][:, order].numpy()
        im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"level {lv}: width {e.shape[1]}")
        if len(order) <= 70:
            labels = [repr(strings[i])[1:-1] for i in order]
            ax.set_xticks(range(len(order)), labels, fontsize=4, rotation=90)
            ax.set_yticks(range(len(order)), labels, fontsize=4)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _dendrogram(model: torch.nn.Module, path: Path) -> None:
    from scipy.cluster.hierarchy import dendrogram, linkage

    strings = token_strings(model.tokenizer)
    emb = model.embed.weight.detach().float().cpu().numpy()
    z = linkage(emb, method="average", metric="cosine")
    fig, ax = plt.subplots(figsize=(max(8, len(strings) * 0.12), 4.5))
    dendrogram(z, labels=[repr(s)[1:-1] for s in strings], ax=ax, leaf_font_size=6, color_threshold=0.7)
    ax.set_ylabel("cosine distance (average linkage)")
    ax.set_title("clusters of the full embedding")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def expert_usage(model: torch.nn.Module, windows: torch.Tensor, path: Path) -> dict | None:
    """Family moe: histogram of how often each expert is selected on ``windows``."""
    if not hasattr(model, "track_usage"):
        return None
    with torch.no_grad(), model.track_usage() as usage:
        model.run(windows, [0])
    hits = usage.hits()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for layer, h in hits.items():
        h = h.double()
        bins = torch.logspace(0, math.log10(max(2.0, float(h.max()) + 1)), 30)
        ax.hist((h[h > 0]).numpy(), bins=bins.numpy(), histtype="step", label=f"layer {layer}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("selections of an expert (token x head picks) on the windows")
    ax.set_ylabel("experts")
    ax.set_title("Expert usage (experts never selected are not drawn)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return usage.summary()


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def analyze(run_dir: str | Path, windows: int = 16) -> Path:
    """Build ``RUN/analysis/report.html`` (and its PNGs, and ``summary.json``)."""
    import fractalformer

    from ..data import as_tensor
    from ..evaluate import evaluate_full
    from ..train.trainer import prepare_data

    run_dir = Path(run_dir)
    model = fractalformer.load(run_dir)
    cfg = model.run_config
    out = run_dir / "analysis"
    out.mkdir(exist_ok=True)
    _, corpus = prepare_data(cfg, model.tokenizer)
    rows = evaluate_full(model, corpus, cfg.model.block_size)
    t = cfg.model.block_size
    n = min(windows, (len(corpus.val) - 1) // t)
    val_windows = as_tensor(corpus.val[: n * t]).view(n, t)
    cons = consistency(model, val_windows)
    usage = expert_usage(model, val_windows, out / "expert_usage.png")
    _heatmaps(model, out / "similarity.png")
    _dendrogram(model, out / "dendrogram.png")
    curves = plot_curves(run_dir)
    cos = pair_cosines(model, [("a", "A"), ("a", "i")])
    ari = emergent_ari(run_dir, model)
    table = [{"level": r.level, "index": r.index, "width": r.width, "params": f"{r.params:,}",
              "val nats/token": f"{r.val_loss:.4f}", f"val bits/{r.unit}": f"{r.val_bpc:.4f}",
              **({k: f"{v:.3f}" for k, v in cons[(r.level, r.index)].items()}
                 if (r.level, r.index) in cons else {"top1_agreement": "-", "expected_acceptance": "-"})}
             for r in rows]
    summary = {"rows": [r.to_json() for r in rows], "cosines": cos, "emergent_ari": ari,
               "consistency": {f"{lv}.{j}": v for (lv, j), v in cons.items()}, "expert_usage": usage}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    cos_rows = [{"pair": k, **{f"width {w}": v for w, v in d.items()}} for k, d in cos.items()]
    ari_rows = [{"width": w, "ARI vs imposed": v} for w, v in ari.items()]
    experts = ""
    if usage is not None:
        layer_rows = [{"layer": k, **{n: f"{v:.4f}" for n, v in r.items()}}
                      for k, r in usage["per_layer"].items()]
        experts = (f"<h2>Experts ({n} validation windows)</h2><p>usage = share of experts selected at "
                   "least once; KL = KL(summed gate weights || uniform) in nats; dead = share of "
                   "experts with under 1% of a uniform share of the gate mass.</p>"
                   f"{_table(layer_rows)}{_img(out / 'expert_usage.png')}")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>
<h1>Analysis of {html.escape(str(run_dir))}</h1>
<p>{html.escape(cfg.model.family)} model, {model.num_params():,} parameters, tokenizer {model.tokenizer.name};
validation on the full split ({rows[0].tokens:,} tokens); consistency on {n} validation windows of {t} tokens
against the full model (top-1 agreement; expected acceptance = mean sum(min(p, q))).</p>
<h2>Sub-models</h2>{_table(table)}
{experts}
<h2>Loss curves</h2>{_img(curves)}
<h2>Embedding similarity per width</h2>{_img(out / "similarity.png")}
<h3>Selected pairs</h3>{_table(cos_rows)}
<h2>Clusters</h2>{_img(out / "dendrogram.png")}
<h3>Emergent clustering vs imposed categories</h3>{_table(ari_rows)}
</body></html>"""
    report = out / "report.html"
    report.write_text(page, encoding="utf-8")
    return report
