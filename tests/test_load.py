"""Loading one sub-model alone: the same weights as extracting it from the whole model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import fractalformer
from fractalformer import FractalError
from fractalformer import checkpoint as ckpt


@pytest.mark.slow
def test_sub_model_load_equals_extraction(fractal_run: Path) -> None:
    trained = fractalformer.load(fractal_run)
    model = trained.model
    for level, index in model.config.sub_models():
        alone = fractalformer.load(fractal_run, level=level, index=index)
        want = model.extract(level, index).state_dict()
        got = alone.model.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), (level, index)
        assert alone.config == model.sub_model_config(level) and not alone.model.training
        assert alone.tokenizer.name == trained.tokenizer.name


@pytest.mark.slow
def test_sub_model_load_rejects_bad_requests_and_files(fractal_run: Path, tmp_path: Path) -> None:
    with pytest.raises(FractalError, match="out of range"):
        fractalformer.load(fractal_run, level=3, index=0)
    with pytest.raises(FractalError, match="both level and index"):
        fractalformer.load(fractal_run, level=1)
    run = tmp_path / "run"
    shutil.copytree(fractal_run, run)
    path = ckpt.current(run).model
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])
    with pytest.raises(FractalError, match="truncated"):
        fractalformer.load(run, level=2, index=3)
