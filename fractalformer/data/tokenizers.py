"""Tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size``, ``name``.

* ``bpe128`` - the seed FractalFormer's 128-token byte-pair tokenizer. Merges are applied
  in list order over the whole sequence (the json's "about" semantics), vectorised with
  numpy so the 1.1M-character TinyShakespeare encodes in well under a second.
* ``char`` - one token per distinct character of the training text (nanoGPT's char model).
* ``byte`` - the 256 byte values of the UTF-8 encoding; round-trips any string.
* ``bpe:N`` - a byte-level BPE of ``N`` tokens trained on the training text with Hugging
  Face ``tokenizers`` (the ``hf`` extra), saved as ``tokenizer.json`` in the run folder.
* ``gpt2`` - GPT-2's 50,257-token BPE through ``tiktoken`` (the ``hf`` extra). tiktoken
  downloads its BPE file on first use and caches it (``TIKTOKEN_CACHE_DIR``); offline,
  without that file, this tokenizer cannot be built.

A tokenizer serialises to a small dict (``to_dict``) stored in the run folder, so a run
always decodes with exactly the vocabulary it was trained on.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..config import check_tokenizer_name
from ..errors import FractalError, UnknownCharacterError
from ..io import cache_dir, write_text

TRAIN_FRACTION = 0.9  # the share of a text (or of its tokens) that trains; the rest validates
BPE_FILE = "tokenizer.json"


def _asset(name: str) -> str:
    return resources.files("fractalformer").joinpath("assets", name).read_text(encoding="utf-8")


class Tokenizer:
    """Base class: subclasses map text to ids and back."""

    name: str
    vocab_size: int
    unit: str = "char"  # what bits-per-unit is measured in ("char" or "byte")

    def encode(self, text: str, on_unknown: str = "error") -> list[int]:
        return self.encode_array(text, on_unknown).tolist()

    def encode_array(self, text: str, on_unknown: str = "error") -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: list[int] | np.ndarray) -> str:
        raise NotImplementedError

    def units(self, text: str) -> int:
        """Length of ``text`` in the unit bits-per-unit is reported in."""
        return len(text)

    def unknown_count(self, text: str) -> int:
        """Characters of ``text`` outside the vocabulary (those ``on_unknown`` applies to)."""
        return 0

    def stream_decoder(self) -> Callable[[int], str]:
        """A function that turns ids one at a time into the text they complete."""
        return lambda i: self.decode([i])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def save(self, run_dir: Path) -> None:
        """Write the files ``to_dict`` refers to into ``run_dir`` (none for most tokenizers)."""

    def to_hf(self) -> Any:
        """The same tokenizer as a Hugging Face ``tokenizers.Tokenizer`` (same ids and text)."""
        raise FractalError(f"the {self.name} tokenizer has no Hugging Face form")


class _TableTokenizer(Tokenizer):
    """Shared code for tokenizers whose base alphabet is a character table."""

    def __init__(self, stoi: dict[str, int]) -> None:
        self.stoi = dict(stoi)
        size = max(self.stoi.values()) + 1
        self._chars = np.array([ord(c) for c in self.stoi], dtype=np.int64)
        self._ids = np.array(list(self.stoi.values()), dtype=np.int64)
        self._itos = [""] * size
        for c, i in self.stoi.items():
            self._itos[i] = c
        order = np.argsort(self._chars)
        self._chars, self._ids = self._chars[order], self._ids[order]
        self.replacement = next((c for c in ("?", " ") if c in self.stoi), next(iter(self.stoi)))

    def unknown_count(self, text: str) -> int:
        """Characters of ``text`` outside the character table."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._chars, codes).clip(max=len(self._chars) - 1)
        return int((self._chars[pos] != codes).sum())

    def _base_ids(self, text: str, on_unknown: str) -> np.ndarray:
        if on_unknown not in ("error", "replace"):
            raise FractalError(f"on_unknown must be 'error' or 'replace', not {on_unknown!r}")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._chars, codes).clip(max=len(self._chars) - 1)
        known = self._chars[pos] == codes
        if not known.all():
            bad = int(np.flatnonzero(~known)[0])
            if on_unknown == "error":
                raise UnknownCharacterError(f"character {text[bad]!r} (U+{ord(text[bad]):04X}) at position "
                                            f"{bad} is not in the {self.name} vocabulary", self.replacement)
            codes = np.where(known, codes, ord(self.replacement))
            pos = np.searchsorted(self._chars, codes)
        return self._ids[pos]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        try:
            return "".join(self._itos[int(i)] for i in ids)
        except IndexError:
            bad = next(int(i) for i in ids if not 0 <= int(i) < len(self._itos))
            raise FractalError(f"token id {bad} is outside the {self.name} vocabulary") from None

    def _hf_merges(self) -> list[tuple[str, str]]:
        return []

    def to_hf(self) -> Any:
        """A BPE over characters with no pre-tokenizer: the whole text is one word, and the
        merges apply by rank, lowest first, left to right - our list-order semantics, since
        every merge only uses tokens made by earlier ones."""
        tk = _require_tokenizers()
        vocab = {c: i for i, c in enumerate(self._itos)}
        if len(vocab) != len(self._itos):
            raise FractalError(f"the {self.name} vocabulary spells two ids alike: no HF equivalent")
        hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=self._hf_merges()))
        hf.decoder = tk.decoders.Fuse()
        return hf


class BPE128Tokenizer(_TableTokenizer):
    """The seed's 65 characters plus 63 merges, each applied in list order."""

    name = "bpe128"

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        spec = spec or json.loads(_asset("bpe128.json"))
        super().__init__(spec["stoi"])
        self.merges = [(int(a), int(b), int(c)) for a, b, c in spec["merges"]]
        self.vocab_size = len(self.stoi) + len(self.merges)
        for a, b, c in self.merges:
            while len(self._itos) <= c:
                self._itos.append("")
            self._itos[c] = self._itos[a] + self._itos[b]

    def encode_array(self, text: str, on_unknown: str = "error") -> np.ndarray:
        ids = self._base_ids(text, on_unknown)
        for a, b, new in self.merges:
            ids = _merge_pair(ids, a, b, new)
        return ids

    def _hf_merges(self) -> list[tuple[str, str]]:
        return [(self._itos[a], self._itos[b]) for a, b, _ in self.merges]



def _merge_pair(ids: np.ndarray, a: int, b: int, new: int) -> np.ndarray:
    """Replace every non-overlapping (a, b), scanning left to right, by ``new``."""
    if len(ids) < 2:
        return ids
    hit = (ids[:-1] == a) & (ids[1:] == b)
    if not hit.any():
        return ids
    starts = np.flatnonzero(hit)
    if a == b:
        # In a run like a a a a, hits at consecutive positions overlap: left to right
        # takes the 1st, 3rd, ... hit of each run of consecutive hit positions.
        new_run = np.ones(len(starts), dtype=bool)
        new_run[1:] = np.diff(starts) != 1
        run_id = np.cumsum(new_run) - 1
        run_start = np.flatnonzero(new_run)
        starts = starts[(np.arange(len(starts)) - run_start[run_id]) % 2 == 0]
    out = ids.copy()
    out[starts] = new
    keep = np.ones(len(ids), dtype=bool)
    keep[starts + 1] = False
    return out[keep]


class CharTokenizer(_TableTokenizer):
    """One id per distinct character of the text it was built from (sorted)."""

    name = "char"

    def __init__(self, chars: str) -> None:
        if not chars:
            raise FractalError("char tokenizer needs a non-empty training text")
        super().__init__({c: i for i, c in enumerate(sorted(set(chars)))})
        self.vocab_size = len(self.stoi)

    def encode_array(self, text: str, on_unknown: str = "error") -> np.ndarray:
        return self._base_ids(text, on_unknown)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chars": "".join(sorted(self.stoi, key=self.stoi.get))}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: never meets an unknown character; loss is reported per byte."""

    name = "byte"
    vocab_size = 256
    unit = "byte"

    def encode_array(self, text: str, on_unknown: str = "error") -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        try:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        except ValueError:
            raise FractalError("byte token ids must lie in 0..255") from None

    def units(self, text: str) -> int:
        return len(text.encode("utf-8"))

    def stream_decoder(self) -> Callable[[int], str]:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: dec.decode(bytes([i]))

    def to_hf(self) -> Any:
        """Byte-level BPE with no merges whose ids are the byte values."""
        tk = _require_tokenizers()
        vocab = {c: b for b, c in _bytes_to_unicode().items()}
        hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = tk.decoders.ByteLevel()
        return hf


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, as byte-level BPE files spell bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def _require_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise FractalError("this needs Hugging Face tokenizers (the hf extra): "
                           "pip install 'fractalformer[hf]'") from None
    return tokenizers


def _chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, cut only after a newline."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


class HFBPETokenizer(Tokenizer):
    """A byte-level BPE trained with Hugging Face ``tokenizers`` (``bpe:N``).

    Text is first split after every newline, then by GPT-2's byte-level rule: a token never
    spans a line end, so a corpus encodes the same whole or in line-aligned pieces (which
    ``prepare`` and the parallel ``encode_batch`` rely on).
    """

    unit = "char"

    def __init__(self, hf: Any, name: str) -> None:
        self.hf = hf
        self.json = hf.to_str()
        self.vocab_size = hf.get_vocab_size()
        self.name = name  # bpe:N as asked for; a small text may give fewer than N tokens
        self.sha256 = hashlib.sha256(self.json.encode()).hexdigest()

    @classmethod
    def train(cls, texts: Iterable[str], size: int) -> HFBPETokenizer:
        tk = _require_tokenizers()
        hf = tk.Tokenizer(tk.models.BPE())
        hf.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split("\n", "merged_with_previous"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
        hf.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        return cls(hf, f"bpe:{size}")

    @classmethod
    def from_json(cls, text: str, name: str) -> HFBPETokenizer:
        tk = _require_tokenizers()
        try:
            return cls(tk.Tokenizer.from_str(text), name)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise FractalError(f"saved BPE tokenizer is not a valid tokenizer.json ({e})") from None

    def encode_array(self, text: str, on_unknown: str = "error") -> np.ndarray:
        ids = [np.asarray(e.ids, dtype=np.int64) for e in self.hf.encode_batch(list(_chunks(text)))]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self.vocab_size for i in ids):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise FractalError(f"token id {bad} is outside the {self.name} vocabulary")
        return self.hf.decode(ids, skip_special_tokens=False)

    def stream_decoder(self) -> Callable[[int], str]:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        table = {c: b for b, c in _bytes_to_unicode().items()}
        return lambda i: dec.decode(bytes(table[c] for c in self.hf.id_to_token(i)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": BPE_FILE, "sha256": self.sha256}

    def save(self, run_dir: Path) -> None:
        write_text(Path(run_dir) / BPE_FILE, self.json)

    def to_hf(self) -> Any:
        return self.hf


class TiktokenTokenizer(Tokenizer):
    """A ``tiktoken`` encoding (``gpt2``): special tokens are never produced from text."""

    unit = "char"

    def __init__(self, encoding: Any) -> None:
        self.enc = encoding
        self.name = encoding.name
        self.vocab_size = encoding.n_vocab

    def encode_array(self, text: str, on_unknown: str = "error") -> np.ndarray:
        parts = self.enc.encode_ordinary_batch(list(_chunks(text)))
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])

    def decode(self, ids: list[int] | np.ndarray) -> str:
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self.vocab_size for i in ids):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise FractalError(f"token id {bad} is outside the {self.name} vocabulary")
        return self.enc.decode(ids, errors="replace")

    def stream_decoder(self) -> Callable[[int], str]:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: dec.decode(self.enc.decode_single_token_bytes(i))

    def to_hf(self) -> Any:
        """Through transformers' converter, which reads the ranks in tiktoken's file format
        (``base64(token) rank`` per line; tiktoken's own writer needs ``blobfile``)."""
        from transformers.convert_slow_tokenizer import TikTokenConverter

        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        with tempfile.TemporaryDirectory() as d:
            path = str(Path(d) / "ranks.tiktoken")
            Path(path).write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks))
            return TikTokenConverter(vocab_file=path, pattern=self.enc._pat_str,
                                     extra_special_tokens=self.enc._special_tokens).converted()


def gpt2_tokenizer() -> TiktokenTokenizer:
    try:
        import tiktoken
    except ImportError:
        raise FractalError("the gpt2 tokenizer needs tiktoken (the hf extra): "
                           "pip install 'fractalformer[hf]'") from None
    try:
        return TiktokenTokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as e:  # requests' connection errors, a bad cached file
        raise FractalError(f"the gpt2 tokenizer could not be built ({type(e).__name__}): tiktoken downloads "
                           f"GPT-2's BPE file on first use, and there is no network and no cached copy "
                           f"(TIKTOKEN_CACHE_DIR); use bpe:N to train a BPE offline") from None


def bpe_size(name: str) -> int | None:
    """N of a ``bpe:N`` name (None for other names); raises on a malformed or too small N."""
    m = re.fullmatch(r"bpe:(\S*)", name)
    if m is None:
        return None
    check_tokenizer_name(name)
    return int(m.group(1))


def train_bpe_cached(text: str, size: int) -> HFBPETokenizer:
    """Train ``bpe:size`` on ``text``, reusing a tokenizer trained before on the same text."""
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
    path = cache_dir() / f"bpe-{key}-{size}.json"
    if path.is_file():
        try:
            return HFBPETokenizer.from_json(path.read_text(encoding="utf-8"), f"bpe:{size}")
        except (FractalError, OSError, UnicodeDecodeError):
            pass  # a damaged cache entry is retrained below
    tok = HFBPETokenizer.train(_chunks(text), size)
    try:
        write_text(path, tok.json)
    except FractalError:
        pass  # caching is an optimisation
    return tok


def get_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    """Look a tokenizer up by name; ``char`` builds its vocabulary from ``text`` and
    ``bpe:N`` is trained on the first 90% of ``text`` (the training split)."""
    check_tokenizer_name(name)
    if bpe_size(name) is not None:
        if text is None:
            raise FractalError(f"the {name} tokenizer is trained on the training text, which is missing")
        return train_bpe_cached(text[: int(TRAIN_FRACTION * len(text))] or text, bpe_size(name))
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "bpe128":
        return BPE128Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if text is None:  # char: the one name left
        raise FractalError("the char tokenizer needs the training text to build its vocabulary")
    return CharTokenizer(text)


def tokenizer_from_dict(spec: dict[str, Any], folder: Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer saved with ``to_dict`` (as stored in a run folder, whose files
    - a ``bpe:N`` tokenizer's ``tokenizer.json`` - are read from ``folder``)."""
    if not isinstance(spec, dict):
        raise FractalError(f"saved tokenizer must be a table, got {spec!r}")
    name = spec.get("name")
    if "file" in spec:
        path = Path(folder or ".") / str(spec["file"])
        if not path.is_file():
            raise FractalError(f"tokenizer file {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = f"not UTF-8 text (byte {e.start})" if isinstance(e, UnicodeDecodeError) else e.strerror
            raise FractalError(f"tokenizer file {path} cannot be read: {why}") from None
        tok = HFBPETokenizer.from_json(text, str(name))
        if tok.sha256 != spec.get("sha256"):
            raise FractalError(f"tokenizer file {path} is not the {name} tokenizer the config names "
                               f"(hash differs)")
        return tok
    if name == "char":
        chars = spec.get("chars")
        if not isinstance(chars, str) or not chars:
            raise FractalError("saved char tokenizer has no character list")
        return CharTokenizer(chars)
    return get_tokenizer(str(name))
