"""Peak memory of loading a whole run against loading one sub-model alone.

    python -m bench.bench_load [RUN] [--level 2 --index 0]

Without RUN, a ``fractal-512`` run folder with untrained weights is written to a
temporary folder (memory does not depend on training). Each load runs in a fresh
process that reports its resident set before loading (after the imports and building a
tiny model on the CPU and on the meta device, one-time costs of any first use) and its peak (VmHWM)
after; the figure is the difference, the memory the load itself took.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fractalformer import checkpoint as ckpt
from fractalformer.runs import save_run_config
from harness import script_parser

CHILD = """
import json, sys, torch, fractalformer
from fractalformer.config import build_config
from fractalformer.models import build_model
def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
build_model(build_config("tiny").model)
with torch.device("meta"):  # the first use of the meta device imports ~65 MiB of Python
    build_model(build_config("tiny").model)
before = kib("VmRSS")
level = None if sys.argv[2] == "-" else int(sys.argv[2])
index = None if sys.argv[3] == "-" else int(sys.argv[3])
m = fractalformer.load(sys.argv[1], level=level, index=index).model
print(json.dumps({"params": m.num_params(), "load_mib": (kib("VmHWM") - before) / 1024}))
"""


def measure(run: Path, level: int | None, index: int | None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(run), "-" if level is None else str(level),
                          "-" if index is None else str(index)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def make_run(folder: Path) -> Path:
    from fractalformer.config import build_config
    from fractalformer.data.tokenizers import get_tokenizer
    from fractalformer.models import build_model
    from fractalformer.train import make_optimizer

    cfg = build_config("fractal-512")
    model = build_model(cfg.model)
    save_run_config(folder, cfg, get_tokenizer(cfg.train.tokenizer))
    ckpt.save_checkpoint(folder, dict(model.state_dict()), make_optimizer(model, cfg),
                         {"step": 0, "elapsed_s": 0.0})
    return folder


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("run", nargs="?")
    ap.add_argument("--level", type=int, default=2)
    ap.add_argument("--index", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(a.run) if a.run else make_run(Path(tmp) / "fractal-512")
        size = ckpt.current(run).model.stat().st_size / 2**20
        full = measure(run, None, None)
        sub = measure(run, a.level, a.index)
    print(f"model.safetensors: {size:.1f} MiB")
    print(f"full model:         {full['params']:>11,} parameters, load peak +{full['load_mib']:.1f} MiB")
    print(f"sub-model ({a.level}, {a.index}):  {sub['params']:>11,} parameters, load peak "
          f"+{sub['load_mib']:.1f} MiB ({sub['load_mib'] / full['load_mib']:.3f} of the full model's)")


if __name__ == "__main__":
    main()
