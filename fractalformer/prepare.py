"""Corpora larger than memory: token ids written once to a memory-mapped binary (nanoGPT style).

``fractalformer prepare DATA... --tokenizer T --out DIR`` reads text files (or every file
under a directory, in sorted order) in pieces of about 1 MB cut after a newline, encodes
each piece and appends its ids to ``DIR/tokens.bin`` (uint16, or uint32 for vocabularies
over 65,536). ``DIR/manifest.json`` records the tokenizer, the dtype, the token count, the
sha256 of the input bytes, the files, and the validation split's characters per token
(for bits/char). Training with ``--data DIR`` memory-maps the ids: only the windows a
batch draws are read. The split is the usual one: the first 90% of tokens train.

A ``bpe:N`` tokenizer is trained on the first 90% of the input bytes, streamed; ``char``
collects its alphabet in a first pass over the input.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .checkpoint import read_json, write_json
from .errors import FractalError
from .tokenizers import CharTokenizer, HFBPETokenizer, Tokenizer, bpe_size, get_tokenizer, tokenizer_from_dict

MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
PIECE = 1 << 20  # bytes read and encoded at a time
TRAIN_FRACTION = 0.9


def input_files(paths: list[str]) -> list[Path]:
    """The files named, and every regular file under the directories named (sorted)."""
    files: list[Path] = []
    for name in paths:
        p = Path(name)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise FractalError(f"data not found: {name}")
    if not files or not sum(f.stat().st_size for f in files):
        raise FractalError(f"no text to prepare in {', '.join(paths)}")
    return files


def pieces(files: list[Path], limit: int | None = None) -> Iterator[tuple[str, int]]:
    """(text, its size in bytes) of about ``PIECE`` bytes each, cut after a newline;
    stops after ``limit`` bytes when given."""
    seen = 0
    for path in files:
        with path.open("rb") as f:
            rest = b""
            while True:
                block = f.read(PIECE)
                data = rest + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                if block and cut == 0:  # no newline: cut anywhere outside a UTF-8 sequence
                    cut = _char_boundary(data)
                piece, rest = data[:cut], data[cut:]
                if piece:
                    try:
                        yield piece.decode("utf-8"), len(piece)
                    except UnicodeDecodeError as e:
                        raise FractalError(f"{path} is not UTF-8 text (byte {seen + e.start})") from None
                    seen += len(piece)
                    if limit is not None and seen >= limit:
                        return
                if not block:
                    break


def _char_boundary(data: bytes) -> int:
    """The largest cut <= len(data) that does not split a UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # ASCII or the lead byte of a sequence
            need = 1 if b < 0x80 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return len(data) if need <= back else len(data) - back
    return len(data)


def build_tokenizer(name: str, files: list[Path], total: int) -> Tokenizer:
    size = bpe_size(name)
    if size is not None:
        return HFBPETokenizer.train((t for t, _ in pieces(files, int(TRAIN_FRACTION * total))), size)
    if name == "char":
        chars: set[str] = set()
        for text, _ in pieces(files):
            chars.update(text)
        return CharTokenizer("".join(chars))
    return get_tokenizer(name)


def prepare(paths: list[str], tokenizer: str, out: str | Path, on_unknown: str = "error",
            progress: bool = True) -> dict[str, Any]:
    """Write ``out/tokens.bin`` and ``out/manifest.json`` (atomically, as one folder)."""
    out = Path(out)
    if out.exists():
        raise FractalError(f"{out} already exists; choose another --out")
    files = input_files(paths)
    total = sum(f.stat().st_size for f in files)
    tok = build_tokenizer(tokenizer, files, total)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        digest, counts = hashlib.sha256(), []  # counts: (tokens, units) of every piece
        with (tmp / TOKENS).open("wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                                  disable=not progress, desc="prepare") as bar:
            for text, nbytes in pieces(files):
                digest.update(text.encode("utf-8"))
                ids = tok.encode_array(text, on_unknown).astype(dtype)
                f.write(ids.tobytes())
                counts.append((len(ids), tok.units(text)))
                bar.update(nbytes)
        n = sum(c for c, _ in counts)
        manifest = {"format": 1, "tokens": TOKENS, "dtype": np.dtype(dtype).name, "count": n,
                    "train_count": int(TRAIN_FRACTION * n), "tokenizer": tok.to_dict(), "unit": tok.unit,
                    "sha256": digest.hexdigest(), "bytes": total,
                    "files": [{"path": str(p), "bytes": p.stat().st_size} for p in files]}
        manifest["val_units_per_token"] = _val_units(tmp / TOKENS, dtype, counts, manifest["train_count"],
                                                     tok) / max(1, n - manifest["train_count"])
        tok.save(tmp)
        write_json(tmp / MANIFEST, manifest)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _val_units(path: Path, dtype: type, counts: list[tuple[int, int]], start: int, tok: Tokenizer) -> int:
    """Characters (bytes) of the text from token ``start`` on: whole pieces counted as
    encoded, the piece the split cuts through decoded from the split on."""
    ids = np.memmap(path, dtype=dtype, mode="r")
    units, pos = 0, 0
    for c, u in counts:
        if pos >= start:
            units += u
        elif pos + c > start:
            units += tok.units(tok.decode(ids[start:pos + c]))
        pos += c
    return units


def is_prepared(path: str | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


def load_prepared(path: str | Path) -> tuple[dict[str, Any], Tokenizer, np.ndarray]:
    """Manifest, tokenizer and the memory-mapped ids (nothing is read until indexed)."""
    path = Path(path)
    m = read_json(path / MANIFEST)
    try:
        dtype = np.dtype(m["dtype"])
        count = int(m["count"])
        tok = tokenizer_from_dict(m["tokenizer"], path)
        tokens = path / m["tokens"]
    except (KeyError, TypeError, ValueError) as e:
        raise FractalError(f"{path / MANIFEST} is not a prepared-data manifest ({e})") from None
    if not tokens.is_file() or tokens.stat().st_size != count * dtype.itemsize:
        raise FractalError(f"{tokens} is missing or does not hold the {count:,} tokens {MANIFEST} records")
    return m, tok, np.memmap(tokens, dtype=dtype, mode="r", shape=(count,))
