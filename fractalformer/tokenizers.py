"""Tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size``, ``name``.

* ``bpe128`` - the seed FractalFormer's 128-token byte-pair tokenizer. Merges are applied
  in list order over the whole sequence (the json's "about" semantics), vectorised with
  numpy so the 1.1M-character TinyShakespeare encodes in well under a second.
* ``char`` - one token per distinct character of the training text (nanoGPT's char model).
* ``byte`` - the 256 byte values of the UTF-8 encoding; round-trips any string.

A tokenizer serialises to a small dict (``to_dict``) stored in the run folder, so a run
always decodes with exactly the vocabulary it was trained on.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np

from .errors import FractalError

TOKENIZERS = ("bpe128", "char", "byte")


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
                raise FractalError(
                    f"character {text[bad]!r} (U+{ord(text[bad]):04X}) at position {bad} "
                    f"is not in the {self.name} vocabulary (on_unknown='replace' maps unknown "
                    f"characters to {self.replacement!r}; the char and byte tokenizers take any text)"
                )
            codes = np.where(known, codes, ord(self.replacement))
            pos = np.searchsorted(self._chars, codes)
        return self._ids[pos]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        try:
            return "".join(self._itos[int(i)] for i in ids)
        except IndexError:
            bad = next(int(i) for i in ids if not 0 <= int(i) < len(self._itos))
            raise FractalError(f"token id {bad} is outside the {self.name} vocabulary") from None


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


def get_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    """Look a tokenizer up by name; ``char`` builds its vocabulary from ``text``."""
    if name == "bpe128":
        return BPE128Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        if text is None:
            raise FractalError("the char tokenizer needs the training text to build its vocabulary")
        return CharTokenizer(text)
    raise FractalError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")


def tokenizer_from_dict(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer saved with ``to_dict`` (as stored in a run folder)."""
    if not isinstance(spec, dict):
        raise FractalError(f"saved tokenizer must be a table, got {spec!r}")
    name = spec.get("name")
    if name == "char":
        chars = spec.get("chars")
        if not isinstance(chars, str) or not chars:
            raise FractalError("saved char tokenizer has no character list")
        return CharTokenizer(chars)
    return get_tokenizer(str(name))
