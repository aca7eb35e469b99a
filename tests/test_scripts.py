"""Every bench and experiment script imports against the current library and answers --help."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(f"{d}.{p.stem}" for d in ("bench", "experiments") for p in (ROOT / d).glob("*.py")
                 if p.stem != "__init__")


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # a script imported by another
@pytest.mark.parametrize("module", SCRIPTS)
def test_script_answers_help(module: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(module, run_name="__main__")
    assert done.value.code == 0
    assert "python -m " + module in capsys.readouterr().out  # the docstring names its command
