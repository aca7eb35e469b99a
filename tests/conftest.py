"""Shared fixtures: an isolated token cache and a tiny trained run."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fractalformer import checkpoint as ckpt
from fractalformer.cli import main
from fractalformer.data.corpus import read_text

torch.set_num_threads(1)  # tiny test models: a second thread costs more in sync than it gives


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
def excerpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped text's first 30,000 characters (shared, read-only): a short text to train
    on, or to score with ``--data`` (all of it, or its first windows with ``--windows``)."""
    path = tmp_path_factory.mktemp("excerpt") / "excerpt.txt"
    path.write_text(read_text(None)[:30_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def fractal_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-step tiny FractalFormer run (levels 3, head_dim nesting; shared, read-only)."""
    out = tmp_path_factory.mktemp("fractal") / "run"
    assert main(["train", "--preset", "tiny", "--quiet", "--set", "family=fractal", "--set", "levels=3",
                 "--set", "sample_tokens=0", "--max-steps", "40", "--out", str(out)]) == 0
    return out


needs_torchrun = pytest.mark.skipif(not hasattr(os, "fork"), reason="torchrun needs a POSIX system")


def losses(run: Path) -> list[float]:
    """The train_loss column of a run's metrics.csv."""
    with (run / "metrics.csv").open() as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


def assert_resume_is_exact(capsys: pytest.CaptureFixture, tmp_path: Path, *args: str | Path) -> None:
    """A run stopped at step 3 and resumed ends with the same weights, bit for bit, as one
    trained straight through (``args``: a train command's options, with ckpt_every=3)."""
    assert run_cli(capsys, "train", *args, "--out", tmp_path / "straight")[0] == 0
    assert run_cli(capsys, "train", *args, "--out", tmp_path / "cut", "--stop-after", "3")[0] == 0
    assert run_cli(capsys, "train", "--out", tmp_path / "cut", "--resume", "--quiet")[0] == 0
    a, b = (load_file(str(ckpt.current(tmp_path / r).model)) for r in ("straight", "cut"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def torchrun(*args: str | Path, ok: bool = True, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    """``fractalformer train ARGS`` as two torchrun processes (on CPU: gloo), one thread each.

    With ``ok`` the run must succeed (else the test fails with the tail of its stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fractalformer", "train", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def assert_two_processes_match_one(tmp_path: Path, *args: str | Path, rtol: float, atol: float,
                                   loss_tol: float | None = None) -> tuple[Path, Path]:
    """Train ARGS in this process (``tmp_path/single``) and under :func:`torchrun` (``tmp_path/ddp``);
    the final weights must agree within ``rtol`` / ``atol`` (and, given ``loss_tol``, the logged
    training losses within it). Returns the two run folders."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", *map(str, args), "--out", str(single)]) == 0
    torchrun(*args, "--out", ddp)
    if loss_tol is not None:
        torch.testing.assert_close(torch.tensor(losses(ddp)), torch.tensor(losses(single)),
                                   rtol=loss_tol, atol=loss_tol)
    wa, wb = (load_file(str(ckpt.current(r).model)) for r in (single, ddp))
    for k in wa:  # all-reduce sums in another order: float rounding only
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol)
    return single, ddp


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
