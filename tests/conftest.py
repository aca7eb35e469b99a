"""Shared fixtures: an isolated token cache and a tiny trained run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fractalformer.cli import main

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["FRACTALFORMER_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


TINY = ["--preset", "tiny", "--quiet"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 20-step tiny run on the shipped data (shared, treat as read-only)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *TINY, "--out", str(out), "--set", "sample_tokens=0"]) == 0
    return out


@pytest.fixture(scope="session")
def fractal_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-step tiny FractalFormer run (levels 3, head_dim nesting; shared, read-only)."""
    out = tmp_path_factory.mktemp("fractal") / "run"
    assert main(["train", "--preset", "tiny", "--quiet", "--set", "family=fractal", "--set", "levels=3",
                 "--set", "sample_tokens=0", "--max-steps", "40", "--out", str(out)]) == 0
    return out
