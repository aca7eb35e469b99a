"""Shared fixtures: an isolated token cache and a tiny trained run."""

from __future__ import annotations

import os
import shutil
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


def chromium(profile: Path):  # -> selenium's Chrome, imported only where a browser exists
    """Debian's headless Chromium under Selenium; skips the test where none is installed."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no chromium/chromedriver (.ci/run installs Debian's chromium and chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for downloads
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))
