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
* for a FractalFormer, every Mix'n'Match model (a level per layer, ``analysis/mixes.py``)
  scored beside the trained sub-models: bits/char against parameters and its Pareto front;
* for runs with token groups: cos('a','A') and cos('a','i') per width, and the adjusted
  Rand index of the last emergent clustering against the seed's imposed categories.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from .. import __version__
from .. import checkpoint as ckpt
from ..data.corpus import as_tensor
from ..data.tokenizers import Tokenizer
from ..device import autocast
from ..errors import FractalError
from ..evaluate import evaluate_full
from ..hierarchy import group_key, groups_to_labels, seed_groups, token_class, token_strings
from ..io import write_text
from ..loading import TrainedModel, load
from ..runs import run_data
from ..train.curves import plot_curves
from .chunks import chunk_summary
from .mixes import mix_scores, mixable, plot_mixes

MIX_WINDOWS = 64  # validation windows every mix is scored on


def embedding_slices(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Level -> the (vocab, width) embedding columns its first sub-model owns."""
    emb = model.embed.weight.detach().float().cpu()
    return {lv: emb[:, model.nest.owned(emb.shape[1], lv)[0]] for lv in range(model.nest.levels)}


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.normalize(x, dim=-1)
    return x @ x.T


def pair_cosines(model: torch.nn.Module, tok: Tokenizer, pairs: list[tuple[str, str]]
                 ) -> dict[str, dict[int, float]]:
    """cos(a, b) at every level width, for each pair whose tokens are in the vocabulary."""
    index = {s: i for i, s in enumerate(token_strings(tok))}
    out = {}
    for a, b in pairs:
        if a in index and b in index:
            out[f"{a},{b}"] = {model.level_width(lv): round(float(cosine_matrix(e)[index[a], index[b]]), 4)
                               for lv, e in embedding_slices(model).items()}
    return out


@torch.no_grad()
def consistency(model: torch.nn.Module, windows: torch.Tensor) -> dict[tuple[int, int], dict[str, float]]:
    """Top-1 agreement and mean sum(min(p, q)) of every sub-model with the full model."""
    logits = model(windows)
    p = torch.softmax(logits[0][0].float(), -1)
    out = {}
    for lv, lg in logits.items():
        q = torch.softmax(lg.float(), -1)  # (n, B, T, V)
        for j in range(q.shape[0]):
            out[(lv, j)] = {"top1_agreement": float((q[j].argmax(-1) == p.argmax(-1)).float().mean()),
                            "expected_acceptance": float(torch.minimum(p, q[j]).sum(-1).mean())}
    return out


def emergent_ari(run_dir: Path, model: torch.nn.Module, tok: Tokenizer) -> dict[int, float]:
    """Adjusted Rand index of the last clustering at each width vs the seed's categories."""
    from sklearn.metrics import adjusted_rand_score

    path = run_dir / "clusters.json"
    if not path.is_file():
        return {}
    widths = [model.level_width(lv) for lv in range(model.nest.levels)]
    imposed = seed_groups(tok, widths)
    v = tok.vocab_size
    out = {}
    try:
        last = json.loads(path.read_text(encoding="utf-8"))[-1]
        for key, groups in last["ids"].items():  # "W" or "W.j"; per width, the mean over its sub-models
            w = group_key(key)[0]
            if w in imposed:
                found = groups_to_labels(groups, v)
                out.setdefault(w, []).append(adjusted_rand_score(groups_to_labels(imposed[w], v), found))
    except (OSError, LookupError, TypeError, ValueError, AttributeError) as e:
        warnings.warn(f"{path} cannot be read as a clustering history ({type(e).__name__}: {e}); the report "
                      f"leaves out the emergent clustering", stacklevel=2)
        return {}
    return {w: round(float(sum(s) / len(s)), 4) for w, s in out.items()}


CLASS_NAMES = ["newline", "space, digits, punctuation", "upper vowels", "upper consonants", "lower vowels",
               "lower consonants"]


def token_labels(tok: Tokenizer) -> list[str]:
    """Printable labels: space as ␣, newline as ↵, bytes that are no character as x80."""
    labels = []
    for i, s in enumerate(token_strings(tok)):
        if tok.name == "byte" and (i >= 128 or not chr(i).isprintable()) and s != "\n":
            labels.append(f"x{i:02x}")
        else:
            labels.append("".join("␣" if c == " " else "↵" if c == "\n" else c if c.isprintable()
                                  else f"x{ord(c):02x}" for c in s))
    return labels


def _heatmaps(model: torch.nn.Module, tok: Tokenizer, out: Path) -> list[Path]:
    """One similarity heatmap per level: tokens ordered by class, classes boxed and named."""
    strings, labels = token_strings(tok), token_labels(tok)
    order = sorted(range(len(strings)), key=lambda i: (token_class(strings[i]), strings[i]))
    classes = [token_class(strings[i]) for i in order]
    edges = [k for k in range(1, len(order)) if classes[k] != classes[k - 1]]
    spans = list(zip([0, *edges], [*edges, len(order)], strict=True))
    paths = []
    for lv, e in embedding_slices(model).items():
        sim = cosine_matrix(e)[order][:, order].numpy()
        side = min(14.0, max(7.0, len(order) * 0.085))  # about 9 pixels a token up to 160 tokens
        fig, ax = plt.subplots(figsize=(side + 1.2, side))
        im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        for k in edges:
            ax.axhline(k - 0.5, color="black", lw=0.6)
            ax.axvline(k - 0.5, color="black", lw=0.6)
        small = 6 if len(order) <= 160 else 3.5
        ax.set_xticks(range(len(order)), [labels[i] for i in order], fontsize=small, rotation=90)
        ax.set_yticks(range(len(order)), [labels[i] for i in order], fontsize=small)
        top = ax.secondary_xaxis("top")
        top.set_xticks([(a + b - 1) / 2 for a, b in spans],
                       [CLASS_NAMES[classes[a]] for a, _ in spans], fontsize=9, rotation=30, ha="left")
        fig.suptitle(f"level {lv}: the {e.shape[1]} embedding columns sub-model ({lv}, 0) owns", y=0.97)
        fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity of two tokens' embeddings")
        path = out / f"similarity_level{lv}.png"
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.86)  # drawn once: no tight bbox
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _dendrogram(model: torch.nn.Module, tok: Tokenizer, seen: list[int], path: Path) -> None:
    """Average-linkage clusters of the embeddings of the tokens the training text uses."""
    from scipy.cluster.hierarchy import dendrogram, linkage

    labels = token_labels(tok)
    emb = model.embed.weight.detach().float().cpu().numpy()[seen]
    z = linkage(emb, method="average", metric="cosine")
    tall = len(seen) > 100  # many leaves read better down the page than across it
    size = (8, max(6, len(seen) * 0.12)) if tall else (max(8, len(seen) * 0.13), 4.8)
    fig, ax = plt.subplots(figsize=size)
    dendrogram(z, labels=[labels[i] for i in seen], ax=ax, leaf_font_size=7, color_threshold=0.7,
               orientation="left" if tall else "top")
    (ax.set_xlabel if tall else ax.set_ylabel)("cosine distance between clusters (average linkage)")
    ax.set_title(f"clusters of the full embedding ({len(seen)} tokens that occur in the training text)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expert_usage(model: torch.nn.Module, windows: torch.Tensor, path: Path) -> dict | None:
    """Family moe: histogram of how often each expert is selected on ``windows``."""
    if not hasattr(model, "track_usage"):
        return None
    with torch.no_grad(), model.track_usage() as usage:
        model(windows, [0])
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


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(rows: list[dict], numeric_from: int = 0) -> str:
    """An HTML table of ``rows`` (dicts with the same keys, written as headers)."""
    if not rows:
        return "<p class=about>(none)</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    def cell(i: int, v: object) -> str:
        return f'<td{" class=num" if i >= numeric_from else ""}>{html.escape(str(v))}</td>'

    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(r.values())) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _samples(trained: TrainedModel, tokens: int = 120) -> list[tuple[str, str]]:
    """A short sample (seed 0, temperature 0.8) from every sub-model."""
    out = []
    for lv, j in trained.config.sub_models():
        text = trained.generate("\n", tokens, seed=0, level=lv, index=j, on_unknown="replace")
        out.append((f"sub-model ({lv}, {j}), width {trained.model.level_width(lv)}", text))
    return out


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;
line-height:1.45}h1{margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta,.about{color:#555}table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:3px 9px;text-align:left}th{background:#f3f3f3}td.num{text-align:right;
font-variant-numeric:tabular-nums}tbody tr:nth-child(even){background:#fafafa}img{max-width:100%;height:auto}
pre{background:#f7f7f7;padding:.6em;white-space:pre-wrap;max-height:14em;overflow:auto}nav a{margin-right:1em}
figure{margin:1em 0}pre.chunks .c0{background:#dbe9f7}pre.chunks .c1{background:#f7e3c8}"""


def _analysis_dir(run_dir: Path) -> Path:
    """``RUN/analysis``, made if need be; a file of that name is the user's, never replaced."""
    out = run_dir / "analysis"
    if out.exists() and not out.is_dir():
        raise FractalError(f"{out} is a file, not a folder: move it away to write the report there")
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise FractalError(f"cannot make {out} ({e.strerror})") from None
    return out


def _curves(run_dir: Path) -> Path | None:
    """The loss curves, or None where there is nothing to draw: no metrics.csv (an extracted,
    merged or grown run before training), or one that is no metrics table (a warning says so)."""
    if not (run_dir / "metrics.csv").exists():
        return None
    try:
        return plot_curves(run_dir)
    except FractalError as e:
        warnings.warn(f"{e}; the report leaves out the loss curves", stacklevel=2)
        return None


def _trained_steps(path: Path) -> int | None:
    """The step ``train_state.json`` records; None where there is none to read (the report says ?)."""
    try:
        step = json.loads(path.read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def analyze(run_dir: str | Path, windows: int = 16, data: str | None = None, device: str = "cpu",
            dtype: str = "auto") -> Path:
    """Build ``RUN/analysis/report.html`` (and its PNGs, and ``summary.json``).

    ``data`` scores another text than the run's own; ``dtype`` bfloat16 (or auto on CUDA)
    runs the model under bf16 autocast.
    """
    run_dir = Path(run_dir)
    trained = load(run_dir, device)
    model, tok, cfg = trained.model, trained.tokenizer, trained.run_config
    corpus = run_data(run_dir, cfg, tok, data)
    out = _analysis_dir(run_dir)
    with autocast(device, dtype):
        rows = evaluate_full(model, corpus, cfg.model.block_size, device)
        t = cfg.model.block_size
        n = min(windows, (len(corpus.val) - 1) // t)
        val_windows = as_tensor(corpus.val[: n * t]).view(n, t).to(device)
        cons = consistency(model, val_windows)
        usage = expert_usage(model, val_windows, out / "expert_usage.png")
        chunks = chunk_summary(model, tok, val_windows, out / "chunk_lengths.png")
        samples = _samples(trained)
        mixes = None
        if mixable(model):
            k = min(MIX_WINDOWS, (len(corpus.val) - 1) // t)
            mixes = mix_scores(model, as_tensor(corpus.val[: k * t]).view(k, t).to(device),
                               corpus.val_units_per_token)
            plot_mixes(mixes, out / "mixes.png", rows[0].unit)
    heatmaps = _heatmaps(model, tok, out)
    counts = torch.bincount(as_tensor(corpus.train), minlength=tok.vocab_size)
    seen = counts.nonzero().flatten().tolist()
    _dendrogram(model, tok, seen, out / "dendrogram.png")
    curves = _curves(run_dir)
    cos = pair_cosines(model, tok, [("a", "A"), ("a", "i")])
    ari = emergent_ari(run_dir, model, tok)
    unit = rows[0].unit
    table = [{"level": r.level, "index": r.index, "width": r.width, "parameters": f"{r.params:,}",
              "validation loss (nats/token)": f"{r.val_loss:.4f}",
              f"validation (bits/{unit})": f"{r.val_bpc:.4f}",
              **({"top-1 agreement": f"{cons[(r.level, r.index)]['top1_agreement']:.3f}",
                  "expected acceptance": f"{cons[(r.level, r.index)]['expected_acceptance']:.3f}"}
                 if (r.level, r.index) in cons else {"top-1 agreement": "-", "expected acceptance": "-"})}
             for r in rows]
    summary = {"rows": [r.to_json() for r in rows], "cosines": cos, "emergent_ari": ari,
               "consistency": {f"{lv}.{j}": v for (lv, j), v in cons.items()}, "expert_usage": usage,
               "mixes": mixes, "chunks": chunks}
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    page = _page(run_dir, trained, rows[0].tokens, n, t, table, samples, usage, curves, heatmaps, cos, ari,
                 len(seen), _trained_steps(ckpt.current(run_dir).state_json), mixes, chunks)
    report = out / "report.html"
    write_text(report, page)
    return report


def _page(run_dir: Path, trained: TrainedModel, val_tokens: int, n: int, t: int, table: list[dict],
          samples: list[tuple[str, str]], usage: dict | None, curves: Path | None, heatmaps: list[Path],
          cos: dict, ari: dict, seen: int, step: int | None, mixes: dict | None,
          chunks: dict | None) -> str:
    """The report as one self-contained HTML page, every section with a line on how to read it."""
    model, tok, cfg = trained.model, trained.tokenizer, trained.run_config
    m, tr = cfg.model, cfg.train
    e = html.escape
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    unit = tok.unit
    run_rows = [{"setting": k, "value": v} for k, v in [
        ("family", m.family), ("levels x split", f"{m.nesting.levels} x {m.nesting.split}"
                                                 if m.nesting.levels > 1 else "1 (dense)"),
        ("width (d_model)", m.d_model), ("layers", m.n_layer), ("heads (query / key-value)",
                                                                 f"{m.n_head} / {m.n_kv_head}"),
        ("context (block_size)", m.block_size), ("parameters", f"{model.num_params():,}"),
        ("tokenizer", f"{tok.name} ({tok.vocab_size} tokens)"),
        ("data", tr.data or "the shipped TinyShakespeare"),
        ("trained", f"{step if step is not None else '?'} of {tr.max_steps} steps, batch {tr.batch_size}, "
                    f"lr {tr.lr:g} -> {tr.min_lr:g}")]]
    experts = ""
    if usage is not None:
        layer_rows = [{"layer": k, **{name: f"{v:.4f}" for name, v in r.items()}}
                      for k, r in usage["per_layer"].items()]
        experts = (f"<h2 id=experts>Experts ({n} validation windows)</h2><p class=about>usage = share of "
                   "experts selected at least once; KL = KL(summed gate weights || uniform) in nats; dead = "
                   "share of experts with under 1% of a uniform share of the gate mass.</p>"
                   f"{_table(layer_rows, 1)}{_img(usage_png(run_dir), 'expert usage histogram')}")
    cos_rows = [{"pair": k, **{f"width {w}": v for w, v in d.items()}} for k, d in cos.items()]
    ari_rows = [{"width": w, "adjusted Rand index vs imposed": v} for w, v in ari.items()]
    ari_part = (f"<h3>Emergent clustering against the imposed categories</h3><p class=about>Adjusted Rand "
                f"index of the last emergent clustering at each width against the seed's categories: 1 = the "
                f"same partition, 0 = no better than chance.</p>{_table(ari_rows, 0)}" if ari_rows else "")
    curves_part = ("<h2 id=curves>Loss curves</h2><p class=about>Left: the full model's training loss (each "
                   "step's batch, and a moving average) and validation loss. Right, for nested models: the "
                   "validation loss of every sub-model, one colour family per level, dashed for level "
                   f"ensembles.</p>{_img(curves, 'loss curves')}" if curves else "")
    mix_part = ""
    if mixes:
        chosen = set(mixes["front"])
        front = sorted((m for m in mixes["mixes"] if m["mix"] in chosen), key=lambda m: m["params"])
        front_rows = [{"mix (level per layer)": m["mix"], "parameters": f"{m['params']:,}",
                       f"bits/{unit}": f"{m['bpc']:.4f}"} for m in front]
        mix_part = (f"<h2 id=mixes>Mix'n'Match</h2><p class=about>Every model that runs each layer at a "
                    f"level of its own ({len(mixes['mixes'])} mixes; <code>--mix 0,1,1,2</code> for sample, "
                    "eval, extract, export and serve): a layer at level l keeps its level-l block diagonal, "
                    f"on the full-width stream. Scored on the first {mixes['windows'][0]} validation "
                    "windows, as are the trained sub-models (diamonds). The table is the Pareto front: no "
                    f"mix is both smaller and better.</p>{_img(run_dir / 'analysis' / 'mixes.png', 'mixes')}"
                    f"{_table(front_rows, 1)}")
    chunk_part = _chunk_part(run_dir, chunks, n, unit) if chunks else ""
    sample_html = "".join(f"<h3>{e(who)}</h3><pre>{e(text)}</pre>" for who, text in samples)
    figures = "".join(f"<figure>{_img(p, p.stem)}</figure>" for p in heatmaps)
    return f"""<!doctype html><html lang=en><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Analysis of {e(run_dir.name)}</title><style>{CSS}</style></head><body>
<h1>Analysis of {e(run_dir.name)}</h1>
<p class=meta>{e(str(run_dir.resolve()))} &middot; generated {when} by fractalformer {__version__}</p>
<nav><a href="#run">Run</a><a href="#subs">Sub-models</a><a href="#samples">Samples</a>{
'<a href="#experts">Experts</a>' if experts else ''}{'<a href="#curves">Loss curves</a>' if curves else ''}{
'<a href="#mixes">Mix&#39;n&#39;Match</a>' if mix_part else ''}{
'<a href="#chunks">Chunks</a>' if chunk_part else ''}
<a href="#similarity">Embedding similarity</a><a href="#clusters">Clusters</a></nav>
<h2 id=run>The run</h2>{_table(run_rows, 2)}
<h2 id=subs>Sub-models</h2>
<p class=about>One row per sub-model (level, index); a level's ensemble averages its sub-models'
log-probabilities. Validation covers the whole validation split ({val_tokens:,} tokens); bits per {unit}
compare across tokenizers. Top-1 agreement is the share of positions, over {n} validation windows of
{t} tokens, where the sub-model's likeliest next token is the full model's; expected acceptance is the mean of
sum(min(p, q)) over the vocabulary - the share of this sub-model's draft tokens that speculative decoding with
the full model as target would accept.</p>
{_table(table, 2)}
<h2 id=samples>Samples</h2><p class=about>120 tokens from every sub-model after a newline, temperature 0.8,
seed 0.</p>{sample_html}
{experts}
{curves_part}
{mix_part}
{chunk_part}
<h2 id=similarity>Embedding similarity per width</h2><p class=about>Cosine similarity between the
embeddings of every pair of tokens, using only the embedding columns that level's first sub-model owns.
Tokens are grouped by class (black lines; names on top); red blocks on the diagonal mean a width keeps
its class together. ␣ is a space, ↵ a newline.</p>{figures}
<h3>Selected pairs</h3><p class=about>cos(a, A) is a case pair, cos(a, i) two vowels, at every width.</p>
{_table(cos_rows, 1)}
<h2 id=clusters>Clusters of the embedding</h2><p class=about>Average-linkage clustering of the full
embedding of the {seen} tokens the training text uses (unused tokens keep their random initial rows and are
left out); tokens joined low down are embedded alike.</p>
{_img(run_dir / "analysis" / "dendrogram.png", "dendrogram")}
{ari_part}
</body></html>
"""


def _chunk_part(run_dir: Path, chunks: dict, n: int, unit: str) -> str:
    """The concept model's own tokens: boundaries drawn on text, lengths, its commonest chunks."""
    e = html.escape
    stretch = "".join(f"<span class=c{i % 2}>{e(c)}</span>" for i, c in enumerate(chunks["stretch"]))
    bpe = chunks["bpe128_top"]
    rows = [{"rank": i + 1, "chunk": repr(c)[1:-1], "count": k,
             "bpe128 token": repr(bpe[i][0])[1:-1] if i < len(bpe) else "",
             "bpe128 count": bpe[i][1] if i < len(bpe) else ""}
            for i, (c, k) in enumerate(chunks["top"])]
    return (f"<h2 id=chunks>Chunks ({chunks['chunking']})</h2><p class=about>Where the model's level-1 "
            f"concepts start (chunking <code>{chunks['chunking']}</code>) on {n} validation windows: "
            f"{chunks['chunks']:,} chunks, mean {chunks['mean']:.2f} {unit}s (median "
            f"{chunks['median']:.0f}), {100 * chunks['one_unit']:.0f}% one {unit} long, "
            f"{chunks['distinct']:,} distinct. Below, the start of the first window, chunks shaded in turn; "
            "then the model's commonest chunks - its own vocabulary - beside the commonest multi-character "
            f"tokens bpe128 cuts the same text into ({100 * chunks['top_in_bpe128']:.0f}% of the chunks "
            f"listed are bpe128 tokens).</p><pre class=chunks>{stretch}</pre>"
            f"{_img(run_dir / 'analysis' / 'chunk_lengths.png', 'chunk lengths')}{_table(rows, 2)}")


def usage_png(run_dir: Path) -> Path:
    return run_dir / "analysis" / "expert_usage.png"
