"""Corpora larger than memory: token ids written once to a memory-mapped binary (nanoGPT style).

``fractalformer prepare DATA... --tokenizer T --out DIR`` reads text files (or every file
under a directory, in sorted order) in pieces of about 1 MB cut after a newline, encodes
each piece and appends its ids to ``DIR/tokens.bin`` (uint16, or uint32 for vocabularies
over 65,536). ``DIR/manifest.json`` records the tokenizer, the dtype, the token count, the
sha256 of the input bytes, the files, the validation split's characters per token (for
bits/char), and the largest id with tokens.bin's modification time. Training with
``--data DIR`` memory-maps the ids: only the windows a batch draws are read, after one
check that every id lies in the vocabulary (the recorded largest id while tokens.bin is
unchanged, else one pass over it). The split is the usual one: the first 90% of tokens train;
with ``--split files`` the validation split is a set of whole files instead (about one in
ten, chosen by a hash of each file's path), written after the training files.
The input ``:stdlib`` names the running interpreter's standard library sources (``*.py``
under ``sysconfig``'s stdlib path, without ``site-packages``): a corpus of code on every
machine, with no download.
A symlink or hard link to a file already read is not read again.

A ``bpe:N`` tokenizer is trained on the first 90% of the input bytes, streamed; ``char``
collects its alphabet in a first pass over the input.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import FractalError
from ..io import read_json, write_json
from .tokenizers import (
    TRAIN_FRACTION,
    CharTokenizer,
    HFBPETokenizer,
    Tokenizer,
    bpe_size,
    get_tokenizer,
    tokenizer_from_dict,
)

MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
PIECE = 1 << 20  # bytes read and encoded at a time
STDLIB = ":stdlib"  # the input naming the interpreter's standard library sources
VAL_SHARE = 10  # --split files: one file in this many validates


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources, sorted: ``*.py`` outside
    ``site-packages``, but for the few test files that are deliberately not UTF-8."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py") if f.is_file() and _utf8(f) and not any(
        part == "site-packages" or part.startswith(".") for part in f.relative_to(root).parts))


def _utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, validation files) for ``--split files``: a file validates when the
    sha256 of its path relative to the files' common folder is 0 modulo :data:`VAL_SHARE`
    (the same choice on every machine with the same files), at least one file each way."""
    if len(files) < 2:
        raise FractalError("--split files needs at least two input files")
    root = Path(os.path.commonpath([f.resolve() for f in files]))
    root = root if root.is_dir() else root.parent

    def validates(f: Path) -> bool:
        key = f.resolve().relative_to(root).as_posix().encode("utf-8")
        return int(hashlib.sha256(key).hexdigest(), 16) % VAL_SHARE == 0

    val = [f for f in files if validates(f)] or files[-1:]
    train = [f for f in files if f not in val] or files[:1]
    return train, [f for f in val if f not in train]


def input_files(paths: list[str]) -> list[Path]:
    """The files named, and every regular file under the directories named (sorted), each real
    file once: a symlink or hard link to a file already listed (GPL-3 -> GPL) is not read again."""
    found: list[Path] = []
    for name in paths:
        p = Path(name)
        if name == STDLIB:
            found += stdlib_files()
        elif p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            found.append(p)
        else:
            raise FractalError(f"data not found: {name}")
    files, seen = [], set()
    for f in found:
        st = f.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            files.append(f)
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


def build_tokenizer(name: str, files: list[Path], train_bytes: int) -> Tokenizer:
    """The tokenizer ``name``; a ``bpe:N`` one trained on the first ``train_bytes`` of ``files``."""
    size = bpe_size(name)
    if size is not None:
        return HFBPETokenizer.train((t for t, _ in pieces(files, train_bytes)), size)
    if name == "char":
        chars: set[str] = set()
        for text, _ in pieces(files):
            chars.update(text)
        return CharTokenizer("".join(chars))
    return get_tokenizer(name)


def prepare(paths: list[str], tokenizer: str, out: str | Path, on_unknown: str = "error",
            progress: bool = True, split: str = "tokens") -> dict[str, Any]:
    """Write ``out/tokens.bin`` and ``out/manifest.json`` (atomically, as one folder).
    ``split``: the validation split is the last tokens, or whole ``files``."""
    out = Path(out)
    if out.exists():
        raise FractalError(f"{out} already exists; choose another --out")
    if split not in ("tokens", "files"):
        raise FractalError(f"split must be tokens or files, not {split!r}")
    files = input_files(paths)
    val_files: list[Path] = []
    if split == "files":
        files, val_files = split_files(files)
        files = files + val_files
    total = sum(f.stat().st_size for f in files)
    val_bytes = sum(f.stat().st_size for f in val_files)
    train_bytes = total - val_bytes if val_files else int(TRAIN_FRACTION * total)
    tok = build_tokenizer(tokenizer, files, train_bytes)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        digest, counts, top = hashlib.sha256(), [], -1  # counts: (tokens, units) of every piece
        train_tokens = 0  # --split files: the tokens of the training files
        with (tmp / TOKENS).open("wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                                  disable=not progress, desc="prepare") as bar:
            for i, path in enumerate(files):
                if i == len(files) - len(val_files):
                    train_tokens = sum(c for c, _ in counts)
                for text, nbytes in pieces([path]):
                    digest.update(text.encode("utf-8"))
                    ids = tok.encode_array(text, on_unknown).astype(dtype)
                    f.write(ids.tobytes())
                    counts.append((len(ids), tok.units(text)))
                    top = max(top, int(ids.max())) if len(ids) else top
                    bar.update(nbytes)
        n = sum(c for c, _ in counts)
        manifest = {"format": 1, "tokens": TOKENS, "dtype": np.dtype(dtype).name, "count": n,
                    "train_count": train_tokens if val_files else int(TRAIN_FRACTION * n),
                    "split": split, "tokenizer": tok.to_dict(), "unit": tok.unit,
                    "sha256": digest.hexdigest(), "bytes": total,
                    "files": [{"path": str(p), "bytes": p.stat().st_size} for p in files],
                    "max_id": top, "tokens_mtime_ns": (tmp / TOKENS).stat().st_mtime_ns}
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
    """Manifest, tokenizer and the memory-mapped ids (read once, for their largest id, unless the
    manifest's record of it still applies), every field checked: bad data must not train."""
    path = Path(path)
    m = read_json(path / MANIFEST)
    check_manifest(m, path / MANIFEST)
    dtype, count = np.dtype(m["dtype"]), m["count"]
    tok = tokenizer_from_dict(m["tokenizer"], path)
    tokens = path / m["tokens"]
    if not tokens.is_file() or tokens.stat().st_size != count * dtype.itemsize:
        raise FractalError(f"{tokens} is missing or does not hold the {count:,} tokens {MANIFEST} records")
    ids = np.memmap(tokens, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
    top = _max_id(m, tokens, ids)
    if top >= tok.vocab_size:
        raise FractalError(f"{tokens} holds token id {top:,}, outside the {tok.name} tokenizer's "
                           f"{tok.vocab_size:,} ids: it does not belong to {MANIFEST} (prepare the data "
                           f"again)")
    return m, tok, ids


REQUIRED = ("tokens", "dtype", "count", "train_count", "tokenizer", "val_units_per_token", "sha256")
DTYPES = ("uint16", "uint32")  # what prepare writes: ids are never negative or fractional


def check_manifest(m: Any, where: Path) -> None:
    """The types and ranges of every manifest field the ids are read by (a manifest from before
    ``max_id`` was recorded has none: its ids are then scanned)."""
    def bad(key: str, want: str) -> FractalError:
        return FractalError(f"{where}: {key} must be {want}, got {m[key]!r}")

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(m, dict):
        raise FractalError(f"{where} is not a prepared-data manifest (a JSON object)")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise FractalError(f"{where} is not a prepared-data manifest: it lacks {', '.join(missing)}")
    name = m["tokens"]
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise bad("tokens", "a file name in the same folder")
    if m["dtype"] not in DTYPES:
        raise bad("dtype", " or ".join(DTYPES))
    if not integer(m["count"]) or m["count"] < 0:
        raise bad("count", "a non-negative integer")
    if not integer(m["train_count"]) or not 0 <= m["train_count"] <= m["count"]:
        raise bad("train_count", f"an integer from 0 to count ({m['count']:,})")
    upt = m["val_units_per_token"]
    if isinstance(upt, bool) or not isinstance(upt, (int, float)) or not 0 < upt < math.inf:
        raise bad("val_units_per_token", "a positive number")
    if not isinstance(m["sha256"], str):
        raise bad("sha256", "a hex string")
    if "unit" in m and m["unit"] not in ("char", "byte"):
        raise bad("unit", "char or byte")
    for key in ("max_id", "tokens_mtime_ns"):
        if key in m and not integer(m[key]):
            raise bad(key, "an integer")


def _max_id(m: dict[str, Any], tokens: Path, ids: np.ndarray) -> int:
    """The largest id in ``tokens``: the manifest's ``max_id`` while the file is unchanged since
    prepare wrote it (its modification time), else one pass over the memory map, a piece at a time."""
    if "max_id" in m and m.get("tokens_mtime_ns") == tokens.stat().st_mtime_ns:
        return m["max_id"]
    return max((int(ids[i:i + PIECE].max()) for i in range(0, len(ids), PIECE)), default=-1)
