"""bpe:N (Hugging Face tokenizers) and tiktoken tokenizers: training, saving, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fractalformer
import fractalformer.data
from fractalformer import FractalError
from fractalformer.config import build_config
from fractalformer.data.tokenizers import HFBPETokenizer, TiktokenTokenizer, get_tokenizer

from .conftest import TINY, run_cli

pytest.importorskip("tokenizers")

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n  Speak, speak.  \n" * 40


def test_bpe_trains_round_trips_and_encodes_the_same_in_pieces() -> None:
    tok = get_tokenizer("bpe:300", TEXT)
    assert tok.vocab_size == 300 and tok.name == "bpe:300"
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT) / 2  # merges learnt
    lines = TEXT.splitlines(keepends=True)
    assert [i for line in lines for i in tok.encode(line)] == ids  # no token spans a line end
    decode = tok.stream_decoder()
    assert "".join(decode(i) for i in tok.encode("Speak, é!")) == "Speak, é!"
    assert get_tokenizer("bpe:300", TEXT).json == tok.json  # cached (and deterministic)


def test_train_with_bpe_saves_the_tokenizer_in_the_run(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data.txt"
    data.write_text(TEXT * 4)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--data", data, "--tokenizer", "bpe:260", "--out", out,
                           "--max-steps", "2", "--set", "sample_tokens=0")
    assert code == 0, err
    spec = json.loads((out / "config.json").read_text())["tokenizer"]
    assert spec["name"] == "bpe:260" and spec["file"] == "tokenizer.json"
    model = fractalformer.load(out)
    assert isinstance(model.tokenizer, HFBPETokenizer) and model.config.vocab_size == 260
    code, text, _ = run_cli(capsys, "eval", out)
    assert code == 0 and "bits per char" in text
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text().replace('"!"', '"?!"', 1))
    with pytest.raises(FractalError, match="hash differs"):
        fractalformer.load(out)


@pytest.mark.parametrize("name", ["bpe:12", "bpe:", "bpe:x", "wordpiece"])
def test_bad_tokenizer_names_are_config_errors(name: str) -> None:
    with pytest.raises(FractalError, match="tokenizer"):
        build_config(None, None, [f"tokenizer={name}"])


def test_tiktoken_encoding_round_trips_and_exports() -> None:
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257}
    enc = tiktoken.Encoding("toy", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={})
    tok = TiktokenTokenizer(enc)
    ids = tok.encode("abc ab é\n")
    assert ids[:3] == [257, 32, 256] and tok.decode(ids) == "abc ab é\n"
    decode = tok.stream_decoder()
    assert "".join(decode(i) for i in ids) == "abc ab é\n"
    assert tok.to_hf().encode("abc ab é\n").ids == ids


def test_gpt2_offline_is_one_clean_line(monkeypatch: pytest.MonkeyPatch) -> None:
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name: str) -> None:
        raise ConnectionError("Max retries exceeded\nwith url: ...")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(FractalError) as e:
        get_tokenizer("gpt2")
    assert "ConnectionError" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["bpe128", "char", "byte", "bpe:300"])
def test_hugging_face_form_gives_the_same_ids_and_text(name: str) -> None:
    text = fractalformer.data.read_text(None)[:5000]
    tok = get_tokenizer(name, TEXT if name.startswith("bpe:") else text)
    sample = text if name != "char" else text[:2000]
    hf = tok.to_hf()
    ids = tok.encode(sample)
    assert hf.encode(sample).ids == ids
    assert hf.decode(ids) == sample
