"""What tokens did the model make? A concept model's level-1 chunks on validation text.

``analyze`` draws the chunk boundaries on a stretch of validation text, the distribution
of chunk lengths, and the most frequent chunks - the model's own vocabulary - beside the
most frequent multi-character tokens bpe128 cuts the same text into.
"""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from ..data.tokenizers import BPE128Tokenizer, Tokenizer
from ..models.concept import ConceptGPT

TOP = 40  # chunks listed


def chunk_texts(starts: torch.Tensor, windows: torch.Tensor, tok: Tokenizer) -> list[list[str]]:
    """Each window's chunks as text (a chunk runs from one start to the next)."""
    out = []
    for row, ids in zip(starts, windows, strict=True):
        cuts = [*row.nonzero().flatten().tolist(), len(ids)]
        out.append([tok.decode(ids[a:b].tolist()) for a, b in itertools.pairwise(cuts)])
    return out


def chunk_summary(model: torch.nn.Module, tok: Tokenizer, windows: torch.Tensor, path: Path) -> dict | None:
    """Family concept: chunk statistics on ``windows`` (n, T), and their length histogram at ``path``."""
    if not isinstance(model, ConceptGPT):
        return None
    starts = model.boundaries(windows).cpu()
    texts = chunk_texts(starts, windows.cpu(), tok)
    lengths = torch.tensor([b - a for row in starts for a, b in itertools.pairwise(
        [*row.nonzero().flatten().tolist(), row.shape[0]])], dtype=torch.float)
    counts = collections.Counter(c for row in texts for c in row)
    bpe = BPE128Tokenizer()
    text = "".join(c for row in texts for c in row)
    pieces = (bpe.decode([i]) for i in bpe.encode(text, "replace"))
    bpe_counts = collections.Counter(s for s in pieces if len(s) > 1)
    top = counts.most_common(TOP)
    in_bpe = {bpe.decode([i]) for i in range(bpe.vocab_size)}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    longest = int(lengths.max())
    ax.hist(lengths.numpy(), bins=torch.arange(0.5, min(longest, 32) + 1.5).numpy(), rwidth=0.85)
    ax.set_xlabel(f"chunk length ({tok.unit}s; longer than 32 in the last bar)" if longest > 32
                  else f"chunk length ({tok.unit}s)")
    ax.set_ylabel("chunks")
    ax.set_title(f"Level-1 chunks ({model.config.concept.chunking}): mean {float(lengths.mean()):.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"chunking": model.config.concept.chunking, "chunks": len(lengths),
            "mean": float(lengths.mean()), "median": float(lengths.median()),
            "one_unit": float((lengths == 1).float().mean()), "distinct": len(counts),
            "top": top, "bpe128_top": bpe_counts.most_common(TOP),
            "top_in_bpe128": sum(c in in_bpe for c, _ in top) / max(len(top), 1),
            "stretch": texts[0][:120]}


def plot_boundaries(stretches: dict[str, list[str]], path: Path, width: int = 96, lines: int = 3) -> None:
    """Each named chunking's chunks of the same text, drawn as shaded boxes in monospace
    (a newline shows as a return arrow), ``lines`` lines of ``width`` characters each."""
    fig, ax = plt.subplots(figsize=(width * 0.105, 0.3 + 0.34 * (lines + 1.2) * len(stretches)))
    y = 0.0
    for name, chunks in stretches.items():
        ax.text(0, y, name, fontsize=9, fontweight="bold", va="center")
        y -= 1
        col, row = 0, 0
        for i, chunk in enumerate(chunks):
            for ch in chunk.replace("\n", "\u21b5"):
                if col == width:
                    col, row = 0, row + 1
                if row == lines:
                    break
                shade = ("#dbe9f7", "#f7e3c8")[i % 2]
                ax.add_patch(plt.Rectangle((col, y - row - 0.42), 1, 0.84, color=shade, lw=0))
                ax.text(col + 0.5, y - row, ch, fontsize=8, family="monospace", ha="center", va="center")
                col += 1
            if row == lines:
                break
        y -= lines + 0.6
    ax.set_xlim(-0.5, width + 0.5)
    ax.set_ylim(y + 0.4, 0.7)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
