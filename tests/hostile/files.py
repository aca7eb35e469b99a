"""Hostile cases: files - prepared corpora, run folders and reports that are damaged, absurd or
not what they claim, and corpora of real-world text."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .common import Case, cli, one_line_error

SHIPPED = Path(__file__).resolve().parents[2] / "fractalformer" / "assets" / "tinyshakespeare.txt"
_BASE: dict[str, Path] = {}
Check = Callable[[Path], str | None]


def _base(work: Path) -> Path:
    """A folder made once per battery process beside the cases' folders: a short text, a tiny run
    trained on it for 2 steps, and that text prepared with the byte tokenizer."""
    if "root" not in _BASE:
        root = work.parent / "files-base"
        root.mkdir()
        (root / "text.txt").write_text(SHIPPED.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
        for args in (["train", "--preset", "tiny", "--data", "text.txt", "--max-steps", "2", "--set",
                      "sample_tokens=0", "--set", "final_eval=2", "--out", "run", "--quiet"],
                     ["prepare", "text.txt", "--tokenizer", "byte", "--out", "prep", "--quiet"]):
            proc = cli(*args, cwd=root)
            if proc.returncode:
                raise RuntimeError(f"fractalformer {args[0]} failed: {proc.stderr.strip()[-300:]}")
        _BASE["root"] = root
    return _BASE["root"]


def _copy(work: Path, name: str) -> Path:
    """A fresh copy of the base folder's ``run`` or ``prep`` in ``work``."""
    return Path(shutil.copytree(_base(work) / name, work / name))


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _refused(proc: subprocess.CompletedProcess[str], *, has: str = "", lacks: str = "",
             gone: Path | None = None) -> str | None:
    """``one_line_error``, and the line says ``has`` (not ``lacks``); ``gone`` was not created."""
    why = one_line_error(proc)
    if why is None and has not in proc.stderr:
        why = f"the error does not say {has!r}: {proc.stderr.strip()[:200]}"
    if why is None and lacks and lacks in proc.stderr:
        why = f"the error says {lacks!r}: {proc.stderr.strip()[:200]}"
    if why is None and gone is not None and gone.exists():
        why = f"{gone.name} was created"
    return why


# -- prepared corpora ------------------------------------------------------------------------------
def _bad_prepared(edit: Callable[[Path], None], has: str, command: str = "train") -> Check:
    """A case: a prepared folder damaged by ``edit``, then trained on (or a run scored on it)."""
    def check(work: Path) -> str | None:
        prep = _copy(work, "prep")
        edit(prep)
        if command == "train":
            proc = cli("train", "--preset", "tiny", "--data", prep, "--max-steps", "1", "--set",
                       "sample_tokens=0", "--out", work / "r", "--quiet", cwd=work)
        else:
            proc = cli("eval", _copy(work, "run"), "--data", prep, cwd=work)
        return _refused(proc, has=has, gone=work / "r")
    return check


def _id_beyond_vocab(prep: Path) -> None:
    ids = np.fromfile(prep / "tokens.bin", dtype=np.uint16)
    ids[1234] = 4000  # the byte tokenizer has 256 ids
    ids.tofile(prep / "tokens.bin")


def _manifest(**changes: object) -> Callable[[Path], None]:
    def edit(prep: Path) -> None:
        _edit_json(prep / "manifest.json", lambda m: m.update(changes))
    return edit


def _drop_count(prep: Path) -> None:
    _edit_json(prep / "manifest.json", lambda m: m.pop("count"))


def _prepare_twice_linked(work: Path) -> str | None:
    (work / "licenses").mkdir()
    (work / "licenses" / "GPL").write_text("the licence text\n" * 50)
    (work / "licenses" / "GPL-3").symlink_to("GPL")
    proc = cli("prepare", "licenses", "--out", "p", "--quiet", cwd=work)
    if proc.returncode:
        return f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
    files = json.loads((work / "p" / "manifest.json").read_text())["files"]
    return None if len(files) == 1 else f"{len(files)} files read for one real file"


def _prepare_default_takes_code(work: Path) -> str | None:
    (work / "code.py").write_text("# digits 0-9, $x = {1: 'é'}\n" * 100)
    proc = cli("prepare", "code.py", "--out", "p", "--quiet", cwd=work)
    return None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"


def _prepare_bpe128_names_flag(work: Path) -> str | None:
    (work / "code.py").write_text("# a comment\n")
    proc = cli("prepare", "code.py", "--tokenizer", "bpe128", "--out", "p", "--quiet", cwd=work)
    return _refused(proc, has="--unknown replace", lacks="on_unknown", gone=work / "p")


# -- run folders -----------------------------------------------------------------------------------
def _absurd_config(key: str, value: int) -> Check:
    def check(work: Path) -> str | None:
        run = _copy(work, "run")
        _edit_json(run / "config.json", lambda d: d["model"].update({key: value}))
        return _refused(cli("eval", run, cwd=work))
    return check


def _absurd_batch(work: Path) -> str | None:
    proc = cli("train", "--preset", "tiny", "--set", "batch_size=1000000000", "--out", "r", "--quiet",
               cwd=work)
    return _refused(proc, has="batch_size", gone=work / "r")


def _absurd_growth(work: Path) -> str | None:
    proc = cli("grow", _copy(work, "run"), "--width", "1000", "--out", "g", cwd=work)
    return _refused(proc, gone=work / "g")


def _bad_tokenizer_file(content: bytes) -> Check:
    """A case: the run's tokenizer is a bpe:N whose tokenizer.json holds ``content``."""
    def check(work: Path) -> str | None:
        run = _copy(work, "run")
        _edit_json(run / "config.json", lambda d: d.update(
            tokenizer={"name": "bpe:300", "file": "tokenizer.json", "sha256": "0" * 64}))
        (run / "tokenizer.json").write_bytes(content)
        return _refused(cli("sample", run, "--max-new-tokens", "2", cwd=work), has="tokenizer")
    return check


def _sample_names_flag(work: Path) -> str | None:
    proc = cli("sample", _copy(work, "run"), "--prompt", "#1", "--max-new-tokens", "2", cwd=work)
    return _refused(proc, has="--unknown replace", lacks="on_unknown")


# -- analyze ---------------------------------------------------------------------------------------
def _report(work: Path, run: Path, warns: str = "") -> str | None:
    """``analyze RUN`` succeeds with a report, saying on stderr only the one line ``warns`` names."""
    proc = cli("analyze", run, "--windows", "2", cwd=work)
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if "Traceback" in proc.stderr or proc.returncode:
        return f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
    if (len(err) != 1 or warns not in err[0]) if warns else err:
        return f"stderr: {proc.stderr.strip()[-200:]}"
    return None if (run / "analysis" / "report.html").is_file() else "no report.html"


def _analyze_without_metrics(make: str) -> Check:
    """A case: ``analyze`` of a run made by ``make`` (extract or grow), which has no metrics.csv."""
    def check(work: Path) -> str | None:
        args = ["--level", "0", "--index", "0"] if make == "extract" else ["--width", "2", "--quiet"]
        proc = cli(make, _copy(work, "run"), *args, "--out", "made", cwd=work)
        if proc.returncode:
            return f"{make} failed: {proc.stderr.strip()[-200:]}"
        return _report(work, work / "made")
    return check


def _analyze_garbage_metrics(work: Path) -> str | None:
    run = _copy(work, "run")
    (run / "metrics.csv").write_bytes(b"\x00\xffnot,a\ntable")
    return _report(work, run, warns="leaves out the loss curves")


def _analyze_garbage_clusters(work: Path) -> str | None:
    run = _copy(work, "run")
    (run / "clusters.json").write_text('[{"step": 1, "ids": "none"}]')
    return _report(work, run, warns="leaves out the emergent clustering")


def _analyze_missing_metrics(work: Path) -> str | None:
    run = _copy(work, "run")
    (run / "metrics.csv").unlink()
    return _report(work, run)


def _analysis_is_a_file(work: Path) -> str | None:
    run = _copy(work, "run")
    (run / "analysis").write_text("my notes")
    why = _refused(cli("analyze", run, "--windows", "2", cwd=work), has="not a folder")
    return why or (None if (run / "analysis").read_text() == "my notes" else "the file was changed")


CASES: list[Case] = [
    Case("files", "prepared ids beyond the vocabulary (train)",
         _bad_prepared(_id_beyond_vocab, "token id 4,000")),
    Case("files", "prepared ids beyond the vocabulary (eval --data)",
         _bad_prepared(_id_beyond_vocab, "token id 4,000", command="eval")),
    Case("files", "prepared manifest dtype float16", _bad_prepared(_manifest(dtype="float16"), "dtype")),
    Case("files", "prepared manifest dtype int8", _bad_prepared(_manifest(dtype="int8"), "dtype")),
    Case("files", "prepared manifest negative train_count",
         _bad_prepared(_manifest(train_count=-10), "train_count")),
    Case("files", "prepared manifest without count", _bad_prepared(_drop_count, "lacks count")),
    Case("files", "prepared manifest that is a list", _bad_prepared(
        lambda p: (p / "manifest.json").write_text("[1, 2]"), "not a prepared-data manifest")),
    Case("files", "prepare reads a symlinked file once", _prepare_twice_linked),
    Case("files", "prepare's default tokenizer takes code", _prepare_default_takes_code),
    Case("files", "prepare --tokenizer bpe128 names --unknown", _prepare_bpe128_names_flag),
    Case("files", "config.json d_model 10^6", _absurd_config("d_model", 10**6)),
    Case("files", "config.json block_size 10^9", _absurd_config("block_size", 10**9)),
    Case("files", "config.json n_layer 200000", _absurd_config("n_layer", 200_000)),
    Case("files", "train --set batch_size=10^9", _absurd_batch),
    Case("files", "grow --width 1000", _absurd_growth),
    Case("files", "tokenizer.json with byte 0xFF", _bad_tokenizer_file(b'{"model": "\xff"}')),
    Case("files", "tokenizer.json that is no tokenizer", _bad_tokenizer_file(b'{"model": [1, 2')),
    Case("files", "sample's unknown character names --unknown", _sample_names_flag),
    Case("files", "analyze an extracted run", _analyze_without_metrics("extract")),
    Case("files", "analyze a grown run", _analyze_without_metrics("grow")),
    Case("files", "analyze with metrics.csv missing", _analyze_missing_metrics),
    Case("files", "analyze with metrics.csv garbage", _analyze_garbage_metrics),
    Case("files", "analyze with clusters.json garbage", _analyze_garbage_clusters),
    Case("files", "analyze where RUN/analysis is a file", _analysis_is_a_file),
]
