from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fractalformer import FractalError, get_tokenizer
from fractalformer.data.corpus import encode_cached, read_text
from fractalformer.data.tokenizers import UnknownCharacterError, _merge_pair, tokenizer_from_dict

from .conftest import run_cli


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return read_text(None)


def reference_bpe(tok, text: str) -> list[int]:
    """The json's semantics written plainly: each merge, in list order, over the whole text."""
    ids = [tok.stoi[c] for c in text]
    for a, b, new in tok.merges:
        out, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                out.append(new)
                i += 2
            else:
                out.append(ids[i])
                i += 1
        ids = out
    return ids


def test_bpe128_exact_count_and_round_trip(shakespeare: str) -> None:
    tok = get_tokenizer("bpe128")
    assert tok.vocab_size == 128
    ids = tok.encode_array(shakespeare)
    assert len(shakespeare) == 1_115_394
    assert len(ids) == 809_324
    assert tok.decode(ids) == shakespeare
    assert ids.min() >= 0 and ids.max() == 127


def test_bpe128_matches_plain_reference(shakespeare: str) -> None:
    tok = get_tokenizer("bpe128")
    for text in (shakespeare[:20_000], "\n\n\n\n\n", "tthe the,\n\n.\n\n\n", "a", ""):
        assert tok.encode(text) == reference_bpe(tok, text)


@pytest.mark.parametrize("n", range(1, 8))
def test_merge_of_equal_pair_is_left_to_right(n: int) -> None:
    ids = np.array([5] * n + [1])
    merged = _merge_pair(ids, 5, 5, 9).tolist()
    assert merged == [9] * (n // 2) + [5] * (n % 2) + [1]


def test_token_cache_is_keyed_by_text_and_tokenizer(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FRACTALFORMER_CACHE", str(tmp_path))
    bpe, byte = get_tokenizer("bpe128"), get_tokenizer("byte")
    a = encode_cached("the cat", bpe)
    assert len(list(tmp_path.iterdir())) == 1
    assert encode_cached("the cat", bpe).tolist() == a.tolist()
    assert len(list(tmp_path.iterdir())) == 1  # reused, not re-written
    assert encode_cached("the cat", byte).tolist() == list(b"the cat")
    assert encode_cached("the dog", bpe).tolist() == bpe.encode("the dog")
    assert len(list(tmp_path.iterdir())) == 3


def test_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FRACTALFORMER_CACHE", str(tmp_path))
    tok = get_tokenizer("bpe128")
    encode_cached("hello there", tok)
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(b"garbage")
    assert encode_cached("hello there", tok).tolist() == tok.encode("hello there")


def test_unknown_character_names_it_and_its_position() -> None:
    tok = get_tokenizer("bpe128")
    with pytest.raises(FractalError, match=r"'é'.*position 2"):
        tok.encode("Thé cat")
    assert tok.decode(tok.encode("Thé cat", on_unknown="replace")) == "Th? cat"


def test_unknown_character_advice_names_the_options_at_hand(tiny_run, capsys) -> None:
    with pytest.raises(UnknownCharacterError) as e:
        get_tokenizer("bpe128").encode("a#b")
    assert str(e.value).endswith("(on_unknown='replace' maps unknown characters to '?'; the char and byte "
                                 "tokenizers take any text)")  # the library's own keyword
    assert e.value.advice("--unknown replace") == ("character '#' (U+0023) at position 1 is not in the "
                                                   "bpe128 vocabulary (--unknown replace maps unknown "
                                                   "characters to '?')")
    code, _, err = run_cli(capsys, "sample", tiny_run, "--prompt", "#", "--max-new-tokens", "1")
    assert code == 2 and "(--unknown replace maps" in err and "on_unknown" not in err


def test_saved_tokenizer_file_that_is_not_text_is_one_line(tmp_path) -> None:
    spec = {"name": "bpe:300", "file": "tokenizer.json", "sha256": "0" * 64}
    (tmp_path / "tokenizer.json").write_bytes(b'{"version": "1.0", \xff}')
    with pytest.raises(FractalError, match=r"tokenizer.json cannot be read: not UTF-8 text \(byte 19\)"):
        tokenizer_from_dict(spec, tmp_path)


def test_char_tokenizer_round_trip_and_serialisation() -> None:
    text = "hello world\nHELLO!"
    tok = get_tokenizer("char", text)
    assert tok.vocab_size == len(set(text))
    assert tok.decode(tok.encode(text)) == text
    again = tokenizer_from_dict(tok.to_dict())
    assert again.encode(text) == tok.encode(text)
    with pytest.raises(FractalError, match="'z'"):
        tok.encode("zz")


def test_unknown_tokenizer_name() -> None:
    with pytest.raises(FractalError, match="unknown tokenizer"):
        get_tokenizer("wordpiece")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip(text: str) -> None:
    tok = get_tokenizer("byte")
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    dec = tok.stream_decoder()
    assert "".join(dec(i) for i in ids) == text
