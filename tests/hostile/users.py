"""Hostile cases: users."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fractalformer.data.tokenizers import get_tokenizer

from .common import Case, cli, one_line_error

_RUNS: list[Path] = []  # one tiny run, trained by the first case that needs it
_FRACTAL: list[Path] = []  # one tiny FractalFormer (2 layers), likewise


def _run(work: Path) -> Path:
    """A finished 2-step tiny run, shared by the cases that only read it."""
    if not _RUNS:
        out = work / "run"
        proc = cli("train", "--preset", "tiny", "--quiet", "--max-steps", "2", "--set", "sample_tokens=0",
                   "--out", out)
        if proc.returncode:
            raise RuntimeError(f"training the shared run failed: {proc.stderr.strip()[-200:]}")
        _RUNS.append(out)
    return _RUNS[0]


def help_without_torch(work: Path) -> str | None:
    """``--help`` answers without loading torch or numpy (seconds of imports)."""
    script = ("import runpy, sys\n"
              "sys.argv = ['fractalformer', '--help']\n"
              "try:\n"
              "    runpy.run_module('fractalformer', run_name='__main__')\n"
              "except SystemExit:\n"
              "    print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]
    return None if last == "[]" else f"--help imported {last}"


def eval_windows(value: str) -> Case:
    def check(work: Path) -> str | None:
        return one_line_error(cli("eval", work / "run", "--windows", value))
    return Case("users", f"eval --windows {value}", check)


def eval_whole_file(work: Path) -> str | None:
    """``eval --data FILE`` scores all of FILE, not the last tenth a training split would leave."""
    text = work / "other.txt"
    text.write_text("Now is the winter of our discontent made glorious summer. " * 40, encoding="utf-8")
    proc = cli("eval", _run(work), "--json", "--data", text)
    if proc.returncode:
        return f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
    want = len(get_tokenizer("bpe128").encode(text.read_text(encoding="utf-8"))) - 1
    got = json.loads(proc.stdout)[0]["tokens"]
    return None if got == want else f"scored {got} tokens of the file's {want}"


def eval_data_too_short(work: Path) -> str | None:
    text = work / "one.txt"
    text.write_text("a", encoding="utf-8")
    return one_line_error(cli("eval", _run(work), "--data", text))


def eval_data_missing(work: Path) -> str | None:
    return one_line_error(cli("eval", _run(work), "--data", work / "no-such.txt"))


def _fractal_run(work: Path) -> Path:
    if not _FRACTAL:
        out = work / "fractal"
        proc = cli("train", "--preset", "tiny-fractal", "--quiet", "--max-steps", "2", "--set",
                   "sample_tokens=0", "--out", out)
        if proc.returncode:
            raise RuntimeError(f"training the shared FractalFormer failed: {proc.stderr.strip()[-200:]}")
        _FRACTAL.append(out)
    return _FRACTAL[0]


def bad_mix(value: str) -> Case:
    def check(work: Path) -> str | None:
        return one_line_error(cli("sample", _fractal_run(work), "--mix", value, "--max-new-tokens", "2"))
    return Case("users", f"sample --mix {value[:20]!r}", check)


def mix_of_a_dense_run(work: Path) -> str | None:
    return one_line_error(cli("eval", _run(work), "--mix", "0,0"))


CASES: list[Case] = [
    Case("users", "--help without importing torch", help_without_torch),
    eval_windows("0"),
    eval_windows("many"),
    Case("users", "eval --data scores the whole file", eval_whole_file),
    Case("users", "eval --data a one-character file", eval_data_too_short),
    Case("users", "eval --data a missing file", eval_data_missing),
    *(bad_mix(v) for v in ("", "9" * 5000, "0,0,0", "-1,0", "0:0:0,0", "a,b", " , ")),
    Case("users", "eval --mix of a dense run", mix_of_a_dense_run),
]
