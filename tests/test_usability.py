"""What a new user trips over: threads, data paths, config files, resume, errors,
help, files, the Python API."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib
import torch

import fractalformer
from fractalformer import checkpoint as ckpt
from fractalformer import runs
from fractalformer.cli import _parser, _warning_line
from fractalformer.config import build_config, config_keys
from fractalformer.data.corpus import Corpus, read_text
from fractalformer.data.tokenizers import get_tokenizer
from fractalformer.device import set_cpu_threads
from fractalformer.io import write_json
from fractalformer.train.curves import _sub_colour, ema, plot_curves

from .conftest import TINY, run_cli
from .test_cli import assert_one_line_error, snapshot

QUICK = [*TINY, "--set", "sample_tokens=0", "--set", "eval_every=2", "--max-steps", "2"]


# -- 1. threads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("threads,env,world,want", [
    (4, "", 2, 2),  # an explicit total is shared among the processes
    (3, "7", 1, 3),  # and wins over the environment
    (0, "3", 2, 3),  # OMP_NUM_THREADS is per process (torchrun sets it so)
])
def test_thread_count_respects_the_choice_and_the_environment(monkeypatch, threads: int, env: str,
                                                               world: int, want: int) -> None:
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", env)
    try:
        assert set_cpu_threads(world, threads) == want == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_threads_flag_reaches_the_config(capsys) -> None:
    code, out, _ = run_cli(capsys, "train", "--preset", "tiny", "--threads", "1", "--print-config")
    assert code == 0 and tomllib.loads(out)["train"]["threads"] == 1
    for command in ("eval", "sample", "speculate", "analyze", "extract", "serve", "config", "merge", "grow"):
        assert "--threads" in _subparser(command).format_help(), command


# -- 2. data paths ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_records_absolute_data_and_notices_a_changed_file(capsys, tmp_path: Path, monkeypatch) -> None:
    text = read_text(None)[:60000]
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    Path("mine.txt").write_text(text)
    assert run_cli(capsys, "train", *QUICK, "--data", "mine.txt", "--out", "run")[0] == 0
    saved = json.loads(Path("run/config.json").read_text())
    assert saved["train"]["data"] == str(tmp_path / "a" / "mine.txt")
    assert len(saved["data_sha256"]) == 64
    monkeypatch.chdir(tmp_path)  # another folder: the run still finds its data
    code, before, _ = run_cli(capsys, "eval", "a/run", "--json")
    assert code == 0
    (tmp_path / "a" / "mine.txt").write_text(text[::-1])
    code, _, err = run_cli(capsys, "eval", "a/run")
    assert_one_line_error(code, err, "has changed since the run was trained")
    code, _, err = run_cli(capsys, "train", "--out", "a/run", "--resume", "--max-steps", "3")
    assert_one_line_error(code, err, "has changed since the run was trained")
    moved = tmp_path / "elsewhere.txt"
    moved.write_text(text)
    (tmp_path / "a" / "mine.txt").unlink()
    code, _, err = run_cli(capsys, "analyze", "a/run")
    assert_one_line_error(code, err, "is not found here")
    code, after, _ = run_cli(capsys, "eval", "a/run", "--json", "--data", moved)
    assert code == 0 and json.loads(after) == json.loads(before)


# -- 3. config files -------------------------------------------------------------------------------
def test_print_config_reads_back_and_writes_nothing(capsys, tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "train", "--preset", "tiny-fractal", "--set", "lr=0.01", "--max-steps",
                           "7", "--print-config", "--out", tmp_path / "never")
    assert code == 0 and not (tmp_path / "never").exists()
    assert "# init_from: unset (training starts from fresh weights)" in out.splitlines()
    f = tmp_path / "printed.toml"
    f.write_text(out)
    want = build_config("tiny-fractal", None, ["lr=0.01", "max_steps=7"])
    assert build_config(None, str(f), []) == want
    code, out, _ = run_cli(capsys, "config", "--preset", "dense")
    lines = out.splitlines()
    assert code == 0 and len(lines) == len(config_keys())  # one line per key
    assert any(line.split()[:3] == ["model", "family", '"gpt"'] for line in lines)


# -- 4, 5. curves after a stop, quiet, the final evaluation ---------------------------------------
@pytest.mark.slow
def test_stopped_run_has_curves_and_quiet_prints_only_the_result(capsys, tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "train", *TINY, "--max-steps", "6", "--stop-after", "3", "--out",
                           tmp_path / "r")
    assert code == 0 and (tmp_path / "r" / "curves.png").is_file()
    code, out, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--resume", "--quiet")
    assert code == 0 and err == ""
    assert out.startswith("validation ") and len(out.splitlines()) == 1, out  # no samples, no chatter
    code, out, _ = run_cli(capsys, "train", *QUICK, "--set", "final_eval=0", "--out", tmp_path / "s")
    assert code == 0 and out == ""


def test_final_evaluation_can_be_limited(capsys, tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "train", *QUICK, "--set", "final_eval=2", "--out", tmp_path / "r")
    assert code == 0 and f"over the first {2 * 32:,} of " in out  # two windows of block_size 32


def test_eval_prints_what_train_printed_and_says_what_it_covered(capsys, tmp_path: Path,
                                                                 excerpt: Path) -> None:
    """By default both score as many windows as the run trained on (2 steps x 8 rows here),
    and both say so; ``--windows all`` and ``--data FILE`` score everything they name."""
    run = tmp_path / "r"
    code, out, _ = run_cli(capsys, "train", *QUICK, "--out", run)
    trained = 2 * 8 * 32
    assert code == 0 and f"over the first {trained:,} of " in out, out
    train_loss = float(out.split()[1])
    code, out, _ = run_cli(capsys, "eval", run)
    assert code == 0 and f"over the first {trained:,} of " in out and "--windows all" in out, out
    row = json.loads(run_cli(capsys, "eval", run, "--json")[1])[0]
    assert row["tokens"] == trained and round(row["val_loss"], 4) == train_loss
    row = json.loads(run_cli(capsys, "eval", run, "--json", "--windows", "all")[1])[0]
    assert row["tokens"] == row["split_tokens"] > trained
    ids = get_tokenizer("bpe128").encode(excerpt.read_text(encoding="utf-8"))
    code, out, _ = run_cli(capsys, "eval", run, "--data", excerpt)
    assert code == 0 and f"over all {len(ids) - 1:,} validation tokens" in out, out  # not its last 10%


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["eval", "--help"]])
def test_help_and_version_do_not_import_torch(args: list[str]) -> None:
    """The answer to --help must not wait for torch to load (seconds)."""
    script = ("import runpy, sys\n"
              f"sys.argv = ['fractalformer', *{args!r}]\n"
              "try:\n"
              "    runpy.run_module('fractalformer', run_name='__main__')\n"
              "except SystemExit as e:\n"
              "    print('exit', e.code, 'torch' in sys.modules, 'numpy' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[-1] == "exit 0 False False", proc.stdout[-500:] + proc.stderr[-500:]


# -- 6. resume ---------------------------------------------------------------------------------------
def test_resume_says_what_it_does_and_refuses_to_go_back(capsys, tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--max-steps", "10")
    assert_one_line_error(code, err, "the run is at step 20; max_steps 10")
    assert snapshot(run) == before
    code, out, _ = run_cli(capsys, "train", "--out", run, "--resume", "--max-steps", "22")
    assert code == 0
    assert "resuming from step 20 of 22 (extended from 20: the cosine schedule now decays over 22" in out


def test_warmup_longer_than_the_run_warns(capsys, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"max_steps \(2\) is below warmup_steps \(5\)"):
        assert run_cli(capsys, "train", *QUICK, "--set", "warmup_steps=5", "--out", tmp_path / "r")[0] == 0
    assert _warning_line(UserWarning("x"), UserWarning, "file.py", 1) == "warning: x\n"  # how main shows it


# -- 7. errors -------------------------------------------------------------------------------------
def test_unusable_run_folders(capsys, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, match in ((a_file, "is a file, not a run folder"), (a_file / "sub", "is a file")):
        code, _, err = run_cli(capsys, "train", *QUICK, "--out", out)
        assert_one_line_error(code, err, match)
    assert a_file.read_text() == "x"


def test_unwritable_run_folder(capsys, tmp_path: Path, monkeypatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere: stand in for a read-only file system
        monkeypatch.setattr(runs.os, "access", lambda path, mode: Path(path) != locked)
    code, _, err = run_cli(capsys, "train", *QUICK, "--out", locked / "run")
    assert_one_line_error(code, err, f"cannot write run folder {locked / 'run'}: {locked} is not writable")
    assert list(locked.iterdir()) == []


def test_bit_flip_and_non_finite_weights_are_errors(capsys, tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    path = ckpt.current(run).model
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor: the file still parses
    path.write_bytes(bytes(data))
    for cmd in (["eval", run], ["sample", run, "--prompt", "Hi"]):
        code, out, err = run_cli(capsys, *cmd)
        assert_one_line_error(code, err, "is corrupt (its contents do not match the checksum")
        assert out == ""
    state = ckpt.load_tensors(ckpt.current(tiny_run).model)
    name = next(iter(state))
    state[name][0] = float("nan")
    ckpt.save_tensors(path, state, {"step": "20"})  # a valid checksum over non-finite weights
    code, _, err = run_cli(capsys, "eval", run)
    assert_one_line_error(code, err, f"tensor {name} holds non-finite values")


def test_mostly_unknown_text_warns_when_replaced() -> None:
    tok = get_tokenizer("bpe128")
    with pytest.warns(UserWarning, match=r"50.0%\) are not in the bpe128 vocabulary and become '\?'"):
        Corpus.build("aé" * 400, tok, 8, on_unknown="replace")


# -- 8. help ---------------------------------------------------------------------------------------
def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_option_is_documented_with_its_default_and_examples(capsys) -> None:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (name, action.dest)
        assert "examples:" in p.format_help(), name
    assert "(default: 200)" in _subparser("sample").format_help()
    train_help = " ".join(_subparser("train").format_help().split())  # wrapped at any width
    assert "fhme, concept, concept-byte, tiny, tiny-fractal" in train_help
    assert "tokens_per_target_call" in _subparser("speculate").format_help()
    assert run_cli(capsys, "--version") == (0, f"fractalformer {fractalformer.__version__}\n", "")


# -- 9. files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_honour_the_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        write_json(tmp_path / "x.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~mask


# -- 11, 12, 14. speculate, the Python API, sampling ----------------------------------------------
def test_speculate_errors_come_before_the_echo(capsys, fractal_run: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "speculate", fractal_run, "--draft", "0:0", "--prompt", "ROMEO:")
    assert_one_line_error(code, err, "is not smaller than the target")
    assert out == ""
    mrl = tmp_path / "mrl"
    assert run_cli(capsys, "train", *QUICK, "--set", "family=mrl", "--set", "levels=3", "--out", mrl)[0] == 0
    code, out, err = run_cli(capsys, "speculate", mrl, "--draft", "2:0")
    assert_one_line_error(code, err, "family mrl: every sub-model reads the full model's body")


def test_generate_matches_the_command_line(capsys, fractal_run: Path) -> None:
    trained = fractalformer.load(fractal_run)
    text = trained.generate("ROMEO:", 15, seed=3, level=1, index=1)
    code, out, _ = run_cli(capsys, "sample", fractal_run, "--prompt", "ROMEO:", "--max-new-tokens", "15",
                           "--seed", "3", "--level", "1", "--index", "1")
    assert code == 0 and out == "ROMEO:" + text + "\n"
    assert trained.generate("ROMEO:", 15, seed=3) != text  # another sub-model, another text
    ids = torch.tensor([trained.tokenizer.encode("ROMEO:")])
    logits = trained.sub_model_logits(ids)
    assert sorted(logits) == trained.config.sub_models() and logits[(2, 3)].shape == (1, ids.shape[1], 128)
    torch.testing.assert_close(logits[(0, 0)], trained.model(ids)[0][0])
    with pytest.raises(fractalformer.FractalError, match="temperature"):
        trained.generate("x", temperature=-1)


def test_device_and_dtype_options(capsys, tiny_run: Path, excerpt: Path) -> None:
    small = excerpt  # another text, so that the two evaluations are quick
    code, out, _ = run_cli(capsys, "eval", tiny_run, "--device", "cpu", "--dtype", "bfloat16", "--json",
                           "--data", small)
    bf16 = json.loads(out)[0]["val_loss"]
    code2, out2, _ = run_cli(capsys, "eval", tiny_run, "--json", "--data", small)
    assert code == code2 == 0 and bf16 == pytest.approx(json.loads(out2)[0]["val_loss"], rel=0.02)
    code, out, _ = run_cli(capsys, "sample", tiny_run, "--dtype", "bfloat16", "--max-new-tokens", "3")
    assert code == 0


def test_license_file_matches_pyproject() -> None:
    root = Path(__file__).parent.parent
    license_name = tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert (root / "LICENSE").read_text().startswith(f"{license_name} License")


# -- 4. curves -------------------------------------------------------------------------------------
def test_smoothing_is_not_pulled_towards_the_first_step() -> None:
    assert ema([5.0, 5.0, 5.0]) == pytest.approx([5.0, 5.0, 5.0])
    assert ema([10.0] + [1.0] * 30)[-1] < 1.2  # started at the first value it would still read 2.9


def test_curves_before_the_first_evaluation_draw_without_warnings(tmp_path: Path) -> None:
    fields = ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpc", "elapsed_s", "train_0.0",
              "train_1.0", "train_1.1", "val_0.0", "val_1.0", "val_1.1", "val_1.ens"]
    lines = [",".join(fields)] + [f"{s},0,0.001,4.{s},,,0,4.{s},4.{s},4.{s},,,," for s in range(1, 4)]
    (tmp_path / "metrics.csv").write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_curves(tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_sub_models_of_a_level_get_distinct_colours() -> None:
    colours = [_sub_colour(lv, j, 2**lv) for lv in range(3) for j in range(2**lv)]
    assert len(set(colours)) == len(colours) == 7


def test_unknown_character_hint_names_what_train_has(capsys, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 40 + "café")
    code, _, err = run_cli(capsys, "train", *QUICK, "--data", text, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "(--set on_unknown=replace maps unknown characters to '?'; "
                                     "--tokenizer byte, char or bpe:N takes any text)")
    assert "--unknown" not in err  # a sample flag, which train does not have


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch) -> None:
    from fractalformer import device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bfloat16 on this CPU is emulated"):
        ctx = device.autocast("cpu", "bfloat16")
    assert isinstance(ctx, torch.autocast)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(device.autocast("cpu", "bfloat16"), torch.autocast)
        assert not isinstance(device.autocast("cpu", "auto"), torch.autocast)  # auto: fp32 on a CPU
        assert not isinstance(device.autocast("cpu", "float32"), torch.autocast)
