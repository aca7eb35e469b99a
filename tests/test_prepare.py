"""fractalformer prepare: a multi-file corpus to memory-mapped ids, and training on them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fractalformer import FractalError
from fractalformer.data import prepared as prep
from fractalformer.data.corpus import Corpus, read_text
from fractalformer.data.tokenizers import get_tokenizer

from .conftest import TINY, run_cli


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """Generated text in three files over two folders, with non-ASCII characters."""
    text = read_text(None)[:120_000]
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text(text[:50_000])
    (root / "b" / "c.txt").write_text(text[50_000:100_000] + "naïve café\n")
    (root / "b" / "d.txt").write_text(text[100_000:])
    (root / ".hidden").write_text("not read")
    return root


def test_prepare_writes_ids_and_manifest(corpus_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "prep"
    code, _, err = run_cli(capsys, "prepare", corpus_dir, "--tokenizer", "byte", "--out", out, "--quiet")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    files = [corpus_dir / "a.txt", corpus_dir / "b" / "c.txt", corpus_dir / "b" / "d.txt"]
    assert [f["path"] for f in m["files"]] == [str(f) for f in files]
    raw = b"".join(f.read_bytes() for f in files)
    assert m["sha256"] == hashlib.sha256(raw).hexdigest() and m["bytes"] == len(raw)
    ids = np.fromfile(out / "tokens.bin", dtype=np.uint16)
    assert m["dtype"] == "uint16" and m["count"] == len(ids) == len(raw)
    assert ids.tobytes() == np.frombuffer(raw, dtype=np.uint8).astype(np.uint16).tobytes()
    assert m["train_count"] == int(0.9 * len(ids)) and m["val_units_per_token"] == 1.0
    tok, corpus = Corpus.prepared(str(out), 32)
    assert isinstance(corpus.train, np.memmap) and tok.name == "byte"
    assert len(corpus.train) + len(corpus.val) == len(ids)


def test_pieces_cut_after_newlines_and_between_characters(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(prep, "PIECE", 7)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\ntwo three\nfour")
    b.write_text("ééééééééé")  # two-byte characters, no newline: cut between them
    parts = list(prep.pieces([a, b]))
    assert "".join(t for t, _ in parts) == a.read_text() + b.read_text()
    assert all(t.endswith("\n") for t, _ in parts[:2]) and sum(n for _, n in parts) == 36
    assert len(parts) >= 5  # b.txt (18 bytes) came in several pieces


def test_train_on_prepared_data_uses_its_tokenizer(corpus_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "prep"
    assert run_cli(capsys, "prepare", corpus_dir / "a.txt", corpus_dir / "b", "--tokenizer", "bpe128",
                   "--out", out, "--quiet", "--unknown", "replace")[0] == 0  # bpe128 lacks the accents
    m = json.loads((out / "manifest.json").read_text())
    tok = get_tokenizer("bpe128")
    whole = "".join(f.read_text() for f in sorted([corpus_dir / "a.txt", *(corpus_dir / "b").iterdir()]))
    val_text = tok.decode(np.fromfile(out / "tokens.bin", dtype=np.uint16)[m["train_count"]:])
    assert m["val_units_per_token"] == pytest.approx(len(val_text) / (m["count"] - m["train_count"]))
    assert len(tok.encode(whole, "replace")) == pytest.approx(m["count"], abs=5)  # only the file ends differ
    run = tmp_path / "run"
    code, text, err = run_cli(capsys, "train", *TINY, "--data", out, "--out", run, "--max-steps", "3",
                              "--set", "sample_tokens=0")
    assert code == 0, err
    assert "bits/char" in text
    code, _, err = run_cli(capsys, "train", *TINY, "--data", out, "--tokenizer", "byte", "--out",
                           tmp_path / "r2", "--max-steps", "3")
    assert code == 2 and "prepared with the bpe128 tokenizer" in err and not (tmp_path / "r2").exists()


def test_prepare_errors_are_one_line_and_write_nothing(corpus_dir: Path, tmp_path: Path, capsys) -> None:
    (corpus_dir / "bad.txt").write_bytes(b"ok\n\xff\xfe")
    for args, msg in [([corpus_dir], "not UTF-8"), ([tmp_path / "nope"], "not found")]:
        code, _, err = run_cli(capsys, "prepare", *args, "--tokenizer", "byte", "--out", tmp_path / "p",
                               "--quiet")
        assert code == 2 and msg in err and len(err.splitlines()) == 1
        assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.*"))
    code, _, err = run_cli(capsys, "prepare", corpus_dir / "a.txt", "--out", corpus_dir, "--quiet")
    assert code == 2 and "already exists" in err


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """A small corpus prepared with the byte tokenizer (vocabulary 256, uint16 ids)."""
    text = tmp_path / "t.txt"
    text.write_text("line 1: #include <a>\n" * 400)
    out = tmp_path / "prep"
    prep.prepare([str(text)], "byte", out, progress=False)
    return out


def _edit_manifest(folder: Path, **changes: object) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m.update(changes)
    (folder / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if v is not None}))


@pytest.mark.parametrize(("changes", "msg"), [
    ({"dtype": "float16"}, "dtype must be uint16 or uint32"), ({"dtype": "int8"}, "dtype must be"),
    ({"train_count": -5}, "train_count must be an integer from 0"), ({"train_count": 10**9}, "train_count"),
    ({"count": "8400"}, "count must be a non-negative integer"), ({"count": None}, "it lacks count"),
    ({"tokenizer": None, "sha256": None}, "lacks tokenizer, sha256"), ({"tokens": "../t.txt"}, "tokens must"),
    ({"val_units_per_token": 0}, "val_units_per_token must be a positive number"),
    ({"unit": "word"}, "unit must be char or byte"), ({"max_id": 1.5}, "max_id must be an integer"),
])
def test_manifest_types_and_ranges_are_checked(prepared: Path, changes: dict, msg: str) -> None:
    Corpus.prepared(str(prepared), 32)  # as written, it loads
    _edit_manifest(prepared, **changes)
    with pytest.raises(FractalError, match=msg):
        Corpus.prepared(str(prepared), 32)


def test_ids_outside_the_vocabulary_are_refused(prepared: Path, tmp_path: Path, capsys) -> None:
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["max_id"] == max(b"line 1: #include <a>\n") and isinstance(m["tokens_mtime_ns"], int)
    ids = np.fromfile(prepared / "tokens.bin", dtype=np.uint16)
    ids[100] = 300  # the byte tokenizer has 256 ids
    ids.tofile(prepared / "tokens.bin")  # a changed file: its recorded max_id no longer applies
    code, _, err = run_cli(capsys, "train", *TINY, "--data", prepared, "--out", tmp_path / "r")
    assert code == 2 and "holds token id 300, outside the byte tokenizer's 256 ids" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "r").exists()
    _edit_manifest(prepared, max_id=None, tokens_mtime_ns=None)  # as an earlier version wrote it
    with pytest.raises(FractalError, match="token id 300"):
        Corpus.prepared(str(prepared), 32)
    ids[100] = 65
    ids.tofile(prepared / "tokens.bin")
    assert len(Corpus.prepared(str(prepared), 32)[1].train) == m["train_count"]


def test_recorded_max_id_saves_the_scan_while_tokens_bin_is_unchanged(prepared: Path) -> None:
    _edit_manifest(prepared, max_id=999)  # the manifest alone changes: the record is believed
    with pytest.raises(FractalError, match="token id 999"):
        Corpus.prepared(str(prepared), 32)


def test_each_real_file_is_read_once(tmp_path: Path) -> None:
    root = tmp_path / "licenses"
    root.mkdir()
    (root / "GPL").write_text("the text of a licence\n" * 20)
    (root / "GPL-3").symlink_to("GPL")
    (root / "GPL-hard").hardlink_to(root / "GPL")
    (root / "MIT").write_text("another\n")
    assert prep.input_files([str(root), str(root / "GPL-3")]) == [root / "GPL", root / "MIT"]
    m = prep.prepare([str(root)], "byte", tmp_path / "p", progress=False)
    assert m["bytes"] == (root / "GPL").stat().st_size + (root / "MIT").stat().st_size


def test_default_tokenizer_takes_any_text_and_errors_name_the_flags(tmp_path: Path, capsys) -> None:
    text = tmp_path / "code.txt"
    text.write_text("x = 42  # the answer, naïvely\n" * 50)
    code, _, err = run_cli(capsys, "prepare", text, "--out", tmp_path / "p", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["tokenizer"] == {"name": "byte"}
    code, _, err = run_cli(capsys, "prepare", text, "--tokenizer", "bpe128", "--out", tmp_path / "q",
                           "--quiet")
    assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "q").exists()
    assert "'=' (U+003D) at position 2" in err and "(--unknown replace maps unknown characters to '?'; " \
        "--tokenizer byte or bpe:N takes any text)" in err and "on_unknown" not in err


def test_split_files_validates_on_whole_files(tmp_path: Path, capsys) -> None:
    """``--split files``: the validation split is exactly the text of whole files, chosen by a
    hash of their relative paths (so the same files on every machine), after the training files."""
    src = tmp_path / "src"
    for i in range(40):
        (src / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"pkg{i % 3}" / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (i + 1))
    code, _, err = run_cli(capsys, "prepare", str(src), "--split", "files", "--out", tmp_path / "p",
                           "--quiet")
    assert code == 0, err
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    files = [Path(f["path"]) for f in m["files"]]
    train, val = prep.split_files(sorted(files))
    assert val and train and files == train + val and m["split"] == "files"
    keys = [hashlib.sha256(f.relative_to(src).as_posix().encode()).hexdigest() for f in val]
    assert all(int(k, 16) % 10 == 0 for k in keys)
    ids = np.fromfile(tmp_path / "p" / "tokens.bin", dtype=m["dtype"])
    assert bytes(ids[m["train_count"]:].astype(np.uint8)) == b"".join(f.read_bytes() for f in val)
    assert bytes(ids[: m["train_count"]].astype(np.uint8)) == b"".join(f.read_bytes() for f in train)
    code, _, err = run_cli(capsys, "prepare", str(src / "pkg0" / "mod0.py"), "--split", "files",
                           "--out", tmp_path / "one")
    assert code == 2 and "at least two input files" in err and not (tmp_path / "one").exists()


def test_stdlib_names_this_pythons_sources() -> None:
    files = prep.stdlib_files()
    names = {f.name for f in files}
    assert len(files) > 100 and {"os.py", "functools.py"} <= names
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert prep.input_files([prep.STDLIB]) == files
