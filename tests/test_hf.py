"""Hugging Face export: the Llama folder computes our logits, greedy text and token ids."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

import fractalformer
from fractalformer.generate import generate

from .conftest import run_cli

# CI installs the hf extra (.[dev]): there a missing transformers fails instead of skipping
transformers = (importlib.import_module("transformers") if os.environ.get("CI")
                else pytest.importorskip("transformers"))

PROMPT = "ROMEO:\nWhat say'st thou?"


def check_parity(ours: torch.nn.Module, level: int, index: int, folder: Path, tok: object) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok.encode(PROMPT)
    assert hf_tok(PROMPT)["input_ids"] == ids
    assert hf_tok.decode(ids) == PROMPT
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, ours.config.vocab_size, (3, ours.config.block_size), generator=gen)
    with torch.no_grad():
        want = ours(x, [level])[level][index]
        got = hf(x).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
    n = ours.config.block_size - len(ids)
    text = list(generate(ours, ids, n, temperature=0.0, level=level, index=index))
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    assert out[0, len(ids):].tolist() == text


@pytest.mark.slow
def test_dense_export_matches(tiny_run: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "export", tiny_run, "--out", tmp_path / "hf")
    assert code == 0, err
    trained = fractalformer.load(tiny_run)
    check_parity(trained.model, 0, 0, tmp_path / "hf", trained.tokenizer)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.slow
def test_every_sub_model_exports(fractal_run: Path, tmp_path: Path) -> None:
    from fractalformer.export import export

    trained = fractalformer.load(fractal_run)
    model, tok = trained.model, trained.tokenizer
    for level, index in model.config.sub_models():
        folder = tmp_path / f"{level}-{index}"
        export(model, tok, folder, level, index)
        check_parity(model, level, index, folder, tok)


def test_export_refuses_an_existing_folder_and_half_a_sub_model(tiny_run: Path, tmp_path: Path,
                                                                 capsys) -> None:
    code, _, err = run_cli(capsys, "export", tiny_run, "--out", tmp_path)
    assert code == 2 and "already exists" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(capsys, "export", tiny_run, "--level", "1", "--out", tmp_path / "x")
    assert code == 2 and "--level and --index go together" in err
    assert not (tmp_path / "x").exists()
