"""Run every hostile case and print a pass count: ``python -m tests.hostile [-k SUBSTRING]``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

from . import GROUPS


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-k", default="", help="run only the cases whose group/name contains this")
    a = p.parse_args()
    cases = [c for g in GROUPS for c in g.CASES if a.k in f"{c.group}/{c.name}"]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FRACTALFORMER_CACHE", str(Path(tmp) / "cache"))
        for i, case in enumerate(cases):
            work = Path(tmp) / f"case{i}"
            work.mkdir()
            try:
                why = case.check(work)
            except Exception:  # a case that crashes is a failed case, not a crashed battery
                why = "the check itself raised: " + traceback.format_exc().strip().splitlines()[-1]
            failed += why is not None
            mark = "ok  " if why is None else "FAIL"
            print(f"{mark} {case.group}/{case.name}" + (f": {why}" if why else ""))
    print(f"{len(cases) - failed} of {len(cases)} handled well")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
