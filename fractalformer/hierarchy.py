"""Hierarchical embeddings: token groups per nested width, their soft-target loss, clustering.

A *groups* mapping says, for a sub-model width, which tokens it should not tell apart.
At that width the loss target is spread uniformly over the target token's group:
``loss = -mean_{v in G(y)} log p(v)``, which is plain cross-entropy when every group is a
singleton. *Imposed* groups come from a file (the seed's categories are shipped for the
``char`` and ``bpe128`` tokenizers); *emergent* groups come from clustering the
embedding columns a width owns (DBSCAN on cosine distance, as the seed, or
agglomerative clustering).

Groups files are JSON: ``{"sizes": {"2": [["a", "b", ...], ...], "4": [...]}}`` with
tokens written as their text; tokens in no group stay singletons. Files a run writes
(``groups.json``, ``clusters.json``) also carry the token ids under ``"ids"`` - text is not
unique for every tokenizer (bytes >= 128 all decode to U+FFFD) - and are read back by id.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .data.tokenizers import Tokenizer
from .errors import FractalError
from .io import write_json, write_text

VOWELS = set("aeiouyAEIOUY")
EOS, MID = "!.?", " $&',-;"


def token_strings(tok: Tokenizer) -> list[str]:
    return [tok.decode([i]) for i in range(tok.vocab_size)]


def token_class(s: str) -> int:
    """Order for heatmaps: newline, punctuation, upper vowels, upper consonants, lower vowels,
    lower consonants (a merged token goes by its first character)."""
    c = s[:1]
    if c == "\n":
        return 0
    if not c.isalpha():
        return 1
    if c.isupper():
        return 2 if c in VOWELS else 3
    return 4 if c in VOWELS else 5


def seed_groups(tok: Tokenizer, widths: list[int]) -> dict[int, list[list[int]]]:
    """The seed's imposed categories, coarsest at the smallest width.

    Widths are sorted and assigned, smallest first: symbols vs letters; end-of-sentence /
    mid-sentence / upper / lower; spaces / vowels (with y) / consonants; the case pairs;
    the largest width keeps the identity. A merged bpe128 token takes the class of its
    first character (so "th" is a lower consonant, ", " a mid-sentence symbol) and its
    case pair is its lower-cased text.
    """
    strings = token_strings(tok)

    def first(s: str) -> str:
        return s[:1]

    rules = [
        lambda s: "letter" if first(s).isalpha() else "symbol",
        lambda s: ("eos" if first(s) in EOS + "\n:" else "mid" if not first(s).isalpha()
                   else "upper" if first(s).isupper() else "lower"),
        lambda s: ("space" if first(s) in " \n" else "vowel" if first(s) in VOWELS
                   else "consonant" if first(s).isalpha() else None),
        lambda s: s.lower() if first(s).isalpha() else None,
    ]
    out: dict[int, list[list[int]]] = {}
    for width, rule in zip(sorted(widths)[:-1], rules, strict=False):
        buckets: dict[str, list[int]] = {}
        for i, s in enumerate(strings):
            key = rule(s)
            if key is not None:
                buckets.setdefault(key, []).append(i)
        out[width] = [g for g in buckets.values() if len(g) > 1]
    return out


def load_groups(path: str, tok: Tokenizer) -> dict[int, list[list[int]]]:
    p = Path(path)
    if not p.is_file():
        raise FractalError(f"groups file not found: {path}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        sizes = d["sizes"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise FractalError(f"groups file {path} is not a JSON object with 'sizes' ({e})") from None
    if "ids" in d:
        return _from_ids(d["ids"], tok, path)
    index = {s: i for i, s in enumerate(token_strings(tok))}
    out: dict[int, list[list[int]]] = {}
    try:
        for width, groups in sizes.items():
            seen: set[int] = set()
            out[int(width)] = []
            for g in groups:
                ids = []
                for s in g:
                    if not isinstance(s, str) or s not in index:
                        raise FractalError(f"groups file {path}: token {s!r} is not in the {tok.name} "
                                           "vocabulary")
                    if index[s] in seen:
                        raise FractalError(f"groups file {path}: token {s!r} is in two groups at size "
                                           f"{width}")
                    seen.add(index[s])
                    ids.append(index[s])
                out[int(width)].append(ids)
    except (AttributeError, TypeError, ValueError) as e:
        raise FractalError(f"groups file {path}: 'sizes' must map widths to lists of token lists "
                           f"({e})") from None
    return out


def _from_ids(sizes: dict, tok: Tokenizer, where: object) -> dict[int | str, list[list[int]]]:
    out: dict[int | str, list[list[int]]] = {}
    try:
        for w, gs in sizes.items():
            group_key(w)  # "W" or "W.j"
            out[w if "." in str(w) else int(w)] = [[int(i) for i in g] for g in gs]
    except (AttributeError, TypeError, ValueError) as e:
        raise FractalError(f"{where}: 'ids' must map widths to lists of id lists ({e})") from None
    if any(not 0 <= i < tok.vocab_size for gs in out.values() for g in gs for i in g):
        raise FractalError(f"{where}: a token id lies outside the {tok.name} vocabulary")
    return out


def group_key(key: int | str) -> tuple[int, int]:
    """(width, sub-model index) of a groups key: ``W`` (every sub-model of width W, index
    -1) or ``"W.j"`` (sub-model j of that width only)."""
    w, _, j = str(key).partition(".")
    return int(w), int(j) if j else -1


def _ordered(groups: dict) -> list:
    return sorted(groups.items(), key=lambda kv: group_key(kv[0]))


def _sizes(groups: dict, tok: Tokenizer) -> dict[str, list[list[str]]]:
    strings = token_strings(tok)
    return {str(w): [[strings[i] for i in g] for g in gs] for w, gs in _ordered(groups)}


def save_groups(path: Path, groups: dict[int, list[list[int]]], tok: Tokenizer, about: str,
                with_ids: bool = True) -> None:
    obj = {"about": about, "tokenizer": tok.name, "sizes": _sizes(groups, tok)}
    if with_ids:
        obj["ids"] = {str(w): gs for w, gs in _ordered(groups)}
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def target_matrix(groups: list[list[int]], vocab: int) -> torch.Tensor:
    """Row y: the loss target for true token y - uniform over y's group (one-hot if alone)."""
    m = torch.eye(vocab)
    for g in groups:
        idx = torch.tensor(g)
        m[idx[:, None], idx[None, :]] = 1.0 / len(g)
    return m


def cluster(x: np.ndarray, method: str = "dbscan", eps: float = 0.1, min_samples: int = 3) -> np.ndarray:
    """Cluster rows of ``x`` by cosine distance; label -1 is noise (a singleton)."""
    from sklearn.cluster import DBSCAN, AgglomerativeClustering

    if method == "dbscan":
        return DBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit_predict(x)
    if method == "agglomerative":
        labels = AgglomerativeClustering(n_clusters=None, distance_threshold=eps, metric="cosine",
                                         linkage="average").fit_predict(x)
        sizes = np.bincount(labels)
        return np.where(sizes[labels] >= min_samples, labels, -1)
    raise FractalError(f"clustering method must be dbscan or agglomerative, not {method!r}")


def labels_to_groups(labels: np.ndarray) -> list[list[int]]:
    return [np.flatnonzero(labels == c).tolist() for c in sorted(set(labels.tolist()) - {-1})]


def groups_to_labels(groups: list[list[int]], vocab: int) -> np.ndarray:
    """Inverse of labels_to_groups; tokens in no group get their own label."""
    labels = np.arange(vocab) + len(groups)
    for c, g in enumerate(groups):
        labels[g] = c
    return labels


def recluster(model: torch.nn.Module, method: str, eps: float, min_samples: int
              ) -> dict[int | str, list[list[int]]]:
    """Emergent groups: for every width but the largest, cluster the embedding columns each
    sub-model owns. A width with one sub-model is keyed ``W``; siblings own different
    columns, so each gets its own grouping, keyed ``"W.j"``."""
    emb = model.embed.weight.detach().float().cpu()
    out: dict[int | str, list[list[int]]] = {}
    for lv in range(1, model.nest.levels):
        owned = model.nest.owned(emb.shape[1], lv)
        w = model.level_width(lv)
        for j, cols in enumerate(owned):
            key = w if len(owned) == 1 else f"{w}.{j}"
            out[key] = labels_to_groups(cluster(emb[:, cols].numpy(), method, eps, min_samples))
    return out


def initial_groups(run_dir: Path, tok: Tokenizer, spec: str, widths: list[int], resume_step: int | None,
                   write: bool = True) -> dict[int, list[list[int]]]:
    """The groups a run starts (or resumes) with; a fresh imposed run saves them as groups.json
    (``write``: only the main process writes)."""
    clusters = run_dir / "clusters.json"
    if resume_step is not None:
        if clusters.is_file():
            past = [c for c in json.loads(clusters.read_text()) if c["step"] <= resume_step]
            if past:
                return _from_ids(past[-1]["ids"], tok, clusters)
        imposed = run_dir / "groups.json"
        return load_groups(str(imposed), tok) if imposed.is_file() else {}
    if not spec:
        return {}
    groups = seed_groups(tok, widths) if spec == "seed" else load_groups(spec, tok)
    if write:
        save_groups(run_dir / "groups.json", groups, tok, f"imposed groups ({spec})")
    return groups


def log_clustering(run_dir: Path, step: int, groups: dict[int, list[list[int]]], tok: Tokenizer,
                   method: str) -> None:
    """Append one clustering to clusters.json (rewritten atomically)."""
    path = run_dir / "clusters.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    history = [c for c in history if c["step"] < step]
    history.append({"step": step, "method": method, "sizes": _sizes(groups, tok),
                    "ids": {str(w): gs for w, gs in _ordered(groups)},
                    "n_groups": {str(w): len(gs) for w, gs in _ordered(groups)}})
    write_json(path, history)
