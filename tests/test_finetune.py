"""Fine-tuning: train --init-from RUN starts from RUN's weights with a fresh optimizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from fractalformer import checkpoint as ckpt

from .conftest import TINY, run_cli

NEW = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30


def test_init_from_starts_at_the_run_weights(tiny_run: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "new.txt"
    data.write_text(NEW)
    out = tmp_path / "ft"
    code, _, err = run_cli(capsys, "train", "--quiet", "--init-from", tiny_run, "--data", data, "--out", out,
                           "--max-steps", "1", "--set", "lr=1e-12", "--set", "min_lr=0", "--set",
                           "warmup_steps=0", "--set", "sample_tokens=0", "--set", "eval_batches=1")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == json.loads((tiny_run / "config.json").read_text())["model"]
    assert cfg["train"]["init_from"] == str(tiny_run) and cfg["tokenizer"]["name"] == "bpe128"
    before, after = (load_file(str(ckpt.current(r).model)) for r in (tiny_run, out))
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert ckpt.read_train_info(out)["step"] == 1  # a fresh optimizer


def test_init_from_mismatches_are_one_line(tiny_run: Path, tmp_path: Path, capsys) -> None:
    cases = [(["--tokenizer", "byte"], "vocab_size 128 (the model of --init-from"),
             (["--set", "d_model=64", "--set", "n_head=2", "--set", "n_kv_head=2"], "do not fit this model"),
             (["--resume"], "only --max-steps")]
    for i, (args, msg) in enumerate(cases):
        out = tmp_path / f"r{i}"
        code, _, err = run_cli(capsys, "train", *TINY, "--init-from", tiny_run, "--out", out, *args)
        assert code == 2 and msg in err and len(err.splitlines()) == 1, err
        assert not out.exists()
