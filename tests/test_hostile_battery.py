"""The hostile battery as a test: every case must be handled well."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_every_hostile_case_is_handled() -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "tests.hostile"], cwd=root, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
