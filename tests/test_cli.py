"""Every bad input: one line on stderr, a non-zero exit, no traceback, nothing overwritten."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fractalformer import checkpoint as ckpt

from .conftest import TINY, run_cli


def assert_one_line_error(code: int, err: str, match: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (its checkpoint folder too) and its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "args,match",
    [
        (["--data", "/no/such/file.txt"], "data file not found"),
        (["--set", "n_kv_head=3"], "multiple of n_kv_head"),
        (["--set", "vocab_size=100"], "vocab_size 100 does not match"),
        (["--set", "block_size=100000"], "fewer than block_size"),
        (["--tokenizer", "nope"], "tokenizer must be one of bpe128, char, byte, bpe:N, gpt2; got 'nope'"),
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--set", "tokenizer=nope"], "tokenizer must be one of"),
        (["--set", "batch_size=-1"], "batch_size must be positive"),
        (["--set", "moe.n_experts=1024"], "n_experts needs family=moe (got family gpt)"),
        (["--set", "combo=4,4"], "combo needs family=concept (got family gpt)"),
    ],
)
def test_bad_train_input(capsys, tmp_path: Path, args: list[str], match: str) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, *args, "--out", out)
    assert_one_line_error(code, err, match)
    assert not out.exists()


def test_empty_and_non_utf8_and_unknown_character_data(capsys, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run_cli(capsys, "train", *TINY, "--data", empty, "--out", tmp_path / "r1")
    assert_one_line_error(code, err, "is empty")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\xff\xfe")
    code, _, err = run_cli(capsys, "train", *TINY, "--data", binary, "--out", tmp_path / "r2")
    assert_one_line_error(code, err, "not UTF-8")
    accented = tmp_path / "acc.txt"
    accented.write_text("the cat sat on the mat " * 40 + "café")
    code, _, err = run_cli(capsys, "train", *TINY, "--data", accented, "--out", tmp_path / "r3")
    assert_one_line_error(code, err, "'é'")
    assert "position 923" in err


@pytest.mark.slow
def test_char_and_byte_tokenizers_train_on_any_text(capsys, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("naïve café, señor! " * 200)
    for name in ("char", "byte"):
        code, out, err = run_cli(capsys, "train", *TINY, "--data", text, "--tokenizer", name,
                                 "--max-steps", "3", "--out", tmp_path / name)
        assert code == 0, err
        assert ("bits/byte" if name == "byte" else "bits/char") in out


@pytest.mark.slow
def test_existing_run_is_not_overwritten(capsys, tiny_run: Path, tmp_path: Path) -> None:
    before = snapshot(tiny_run)
    code, _, err = run_cli(capsys, "train", *TINY, "--out", tiny_run)
    assert_one_line_error(code, err, "already holds a run")
    assert snapshot(tiny_run) == before
    code, _, err = run_cli(capsys, "train", "--resume", "--out", tmp_path / "none")
    assert_one_line_error(code, err, "run folder not found")
    code, _, err = run_cli(capsys, "train", "--resume", "--out", tiny_run, "--set", "lr=1")
    assert_one_line_error(code, err, "saved config")
    assert snapshot(tiny_run) == before


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.mark.slow
def test_corrupt_and_truncated_checkpoint(capsys, run_copy: Path) -> None:
    model = ckpt.current(run_copy).model
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    for cmd in (["eval", run_copy], ["sample", run_copy, "--prompt", "Hi"]):
        code, _, err = run_cli(capsys, *cmd)
        assert_one_line_error(code, err, "corrupt or truncated")
    model.write_bytes(b"\x00" * 100)
    code, _, err = run_cli(capsys, "eval", run_copy)
    assert_one_line_error(code, err, "corrupt or truncated")
    before = snapshot(run_copy)
    code, _, err = run_cli(capsys, "train", "--resume", "--out", run_copy, "--max-steps", "30")
    assert_one_line_error(code, err, "corrupt or truncated")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("key,value,command,match", [
    ("d_model", 64, "eval", "config.json implies"),
    ("vocab_size", 100, "sample", "vocab_size 100 does not match"),
])
def test_config_that_does_not_match_the_run(capsys, run_copy: Path, key: str, value: int, command: str,
                                            match: str) -> None:
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["model"][key] = value
    (run_copy / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, command, run_copy)
    assert_one_line_error(code, err, match)


def test_broken_config_json(capsys, run_copy: Path) -> None:
    (run_copy / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "eval", run_copy)
    assert_one_line_error(code, err, "not valid JSON")
    (run_copy / "config.json").write_text('{"model": {"n_layer": -2}}')
    code, _, err = run_cli(capsys, "eval", run_copy)
    assert_one_line_error(code, err, "n_layer must be positive")


def test_sample_bad_input(capsys, tiny_run: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "sample", tiny_run, "--prompt", "Olá")
    assert_one_line_error(code, err, "position 2")
    code, out, _ = run_cli(capsys, "sample", tiny_run, "--prompt", "Olá", "--unknown", "replace",
                           "--max-new-tokens", "3")
    assert code == 0 and out.startswith("Ol?")  # the echo is what the model saw
    code, _, err = run_cli(capsys, "sample", tiny_run, "--ensemble", "--index", "1")
    assert_one_line_error(code, err, "give one of them")
    code, _, err = run_cli(capsys, "sample", tiny_run, "--prompt", "")
    assert_one_line_error(code, err, "prompt is empty")
    code, _, err = run_cli(capsys, "sample", tiny_run, "--top-p", "1.5")
    assert_one_line_error(code, err, "top_p must lie in (0, 1]")
    code, _, err = run_cli(capsys, "sample", tmp_path / "missing")
    assert_one_line_error(code, err, "run folder not found")


@pytest.mark.slow
def test_eval_json_and_sample_stream(capsys, tiny_run: Path) -> None:
    code, out, _ = run_cli(capsys, "eval", tiny_run, "--json")
    rows = json.loads(out)
    assert code == 0 and {"val_loss", "val_bpc", "params"} <= rows[0].keys()
    assert rows[0]["val_bpc"] == pytest.approx(rows[0]["val_loss"] / 0.6931471805599453 / 1.37, rel=0.02)
    code, out, _ = run_cli(capsys, "sample", tiny_run, "--prompt", "ROMEO:" * 30, "--seed", "1",
                           "--max-new-tokens", "20")
    code2, out2, _ = run_cli(capsys, "sample", tiny_run, "--prompt", "ROMEO:" * 30, "--seed", "1",
                             "--max-new-tokens", "20", "--no-cache")
    assert code == code2 == 0 and out == out2 and len(out) > len("ROMEO:" * 30)


@pytest.mark.slow
def test_real_process_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fractalformer", "eval", str(tmp_path / "nothing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: run folder not found: {tmp_path / 'nothing'}"


def test_checkpoint_cut_off_between_model_and_state(capsys, run_copy: Path) -> None:
    path = ckpt.current(run_copy).state_json
    state = json.loads(path.read_text())
    state["step"] = 10  # as in a run folder of an earlier version cut off after the step-20 model
    path.write_text(json.dumps(state))
    code, _, err = run_cli(capsys, "train", "--out", run_copy, "--resume", "--max-steps", "30")
    assert_one_line_error(code, err, "are from different steps")


def test_more_bad_values(capsys, tiny_run: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "sample", tiny_run, "--temperature", "nan", "--prompt", "ROMEO:")
    assert_one_line_error(code, err, "temperature must be a finite number >= 0 (0: greedy), got nan")
    assert out == ""  # nothing echoed before the error
    code, _, err = run_cli(capsys, "train", *TINY, "--set", "seed=99999999999999999999", "--out",
                           tmp_path / "s")
    assert_one_line_error(code, err, "seed must lie in")
