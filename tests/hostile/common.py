"""What every hostile case shares: running the CLI as a user would, and what "handled well" means."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """One bad input or fault. ``check`` runs it in the folder it is given and returns
    ``None`` when it was handled well, else a one-line reason."""

    group: str
    name: str
    check: Callable[[Path], str | None]


def cli(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``fractalformer ARGS`` in a fresh process, one thread, as a user would run it."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fractalformer", *map(str, args)], cwd=cwd, env=full_env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str | None:
    """``None`` when PROC failed as bad input must: exit CODE, no traceback, one line on stderr."""
    err = proc.stderr.strip()
    if "Traceback" in proc.stderr or "Traceback" in proc.stdout:
        return "traceback: " + err.splitlines()[-1][:200] if err else "traceback"
    if proc.returncode != code:
        return f"exit {proc.returncode}, wanted {code}: {err[-200:]}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr: {err[-200:]}"
    return None
