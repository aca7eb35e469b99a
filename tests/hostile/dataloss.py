"""Hostile cases: dataloss. Kills, a second writer, full disks and damaged run folders must
never cost a saved checkpoint, and each must be one line."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fractalformer import checkpoint as ckpt
from fractalformer.errors import FractalError

from .common import Case, cli, one_line_error

QUICK = ["--preset", "tiny", "--quiet", "--max-steps", "2", "--set", "sample_tokens=0",
         "--set", "eval_batches=1", "--set", "final_eval=0"]
LONG = ["--preset", "tiny", "--quiet", "--max-steps", "100000", "--set", "ckpt_every=1",
        "--set", "eval_every=100000", "--set", "sample_tokens=0", "--set", "final_eval=0"]


def _quick_run(work: Path, *sets: str) -> Path:
    """A copy of a finished 2-step tiny run (trained once per battery, beside the cases' folders)."""
    name = "quick-run" + "".join(f"-{s}" for s in sets)
    shared = work.parent / name
    if not shared.is_dir():
        proc = cli("train", *QUICK, *(a for s in sets for a in ("--set", s)), "--out", shared)
        if proc.returncode:
            raise RuntimeError(f"the quick run failed: {proc.stderr[-300:]}")
    shutil.copytree(shared, work / "run")
    return work / "run"


def _step(run: Path) -> int | None:
    try:
        return ckpt.read_train_info(run)["step"]
    except FractalError:
        return None


def _start(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fractalformer", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> str | None:
    """Poll until ``ready()`` (up to two minutes); a reason if the process ended first."""
    for _ in range(1200):
        if ready():
            return None
        if proc.poll() is not None:
            return f"the training ended early (exit {proc.returncode}): {proc.stderr.read()[-200:]}"
        time.sleep(0.1)
    proc.kill()
    proc.communicate()
    return "timed out"


def _limited(limit: int) -> Callable[[], None]:
    """A child's pre-exec hook: no file it writes may grow past ``limit`` bytes (a full disk,
    without root: writes past it fail with EFBIG, as Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _cli_limited(limit: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fractalformer", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_limited(limit),
                          timeout=300)


def _stray(folder: Path) -> list[str]:
    """Temporary files a failed write left behind (hidden names other than the lock)."""
    return [str(p) for p in folder.rglob(".*") if p.name != ckpt.LOCK]


def kill_during_checkpoints(work: Path) -> str | None:
    out = work / "run"
    last = 0
    for i in range(3):
        proc = _start(*(LONG if i == 0 else ["--resume", "--quiet"]), "--out", out)
        if why := _wait(proc, lambda last=last: (_step(out) or 0) >= last + 2):
            return why
        time.sleep(0.005 * i)
        proc.kill()
        proc.communicate()
        last = _step(out) or 0
    proc = cli("train", "--out", out, "--resume", "--quiet", "--stop-after", "1")
    return None if proc.returncode == 0 else f"resumed: exit {proc.returncode}: {proc.stderr[-90:]}"


def second_writer(work: Path) -> str | None:
    out = work / "run"
    first = _start(*LONG, "--out", out)
    try:
        if why := _wait(first, lambda: (_step(out) or 0) >= 1):
            return why
        for args in (["--resume"], QUICK):
            proc = cli("train", "--out", out, *args)
            if why := one_line_error(proc):
                return why
            if f"PID {first.pid}" not in proc.stderr:
                return f"the holder is not named: {proc.stderr.strip()}"
    finally:
        first.kill()
        first.communicate()
    return None


def sigterm_saves(work: Path) -> str | None:
    out = work / "run"
    proc = _start(*LONG, "--set", "ckpt_every=100000", "--out", out)
    metrics = out / "metrics.csv"
    if why := _wait(proc, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) > 3):
        return why
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode != 130 or "Traceback" in stderr:
        return f"exit {proc.returncode}: {stderr[-200:]}"
    if f"at step {_step(out)};" not in stdout:
        return f"no checkpoint of the step it stopped at: {stdout[-200:]}"
    return None


def unfinished_folder(work: Path) -> str | None:
    run = _quick_run(work)
    shutil.rmtree(run / ckpt.CHECKPOINTS)  # as a kill before the first checkpoint leaves it
    (run / ckpt.POINTER).unlink()
    if why := one_line_error(cli("train", "--out", run, "--resume")):
        return f"--resume: {why}"
    proc = cli("train", *QUICK, "--out", run)
    return None if proc.returncode == 0 else f"train into it: exit {proc.returncode}: {proc.stderr[-200:]}"


def disk_full_first_checkpoint(work: Path) -> str | None:
    _quick_run(work)  # the token cache is written beforehand
    proc = _cli_limited(100_000, "train", *QUICK, "--out", work / "new")
    if why := one_line_error(proc):
        return why
    return f"{work / 'new'} was left behind" if (work / "new").exists() else None


def disk_full_resume(work: Path) -> str | None:
    run = _quick_run(work)
    before = ckpt.current(run)
    proc = _cli_limited(100_000, "train", "--out", run, "--resume", "--max-steps", "4", "--quiet")
    if why := one_line_error(proc):
        return why
    if ckpt.current(run) != before or _step(run) != 2:
        return "the checkpoint changed"
    if len(list((run / ckpt.CHECKPOINTS).iterdir())) != 1 or _stray(run):
        return f"temporary files left: {_stray(run)}"
    return None


def disk_full_prepare(work: Path) -> str | None:
    text = work / "t.txt"
    text.write_text("to be or not to be, that is the question\n" * 8000)
    proc = _cli_limited(100_000, "prepare", text, "--out", work / "p", "--quiet")
    if why := one_line_error(proc):
        return why
    left = (work / "p").exists() or _stray(work)
    return f"left behind: {[p.name for p in work.iterdir()]}" if left else None


def disk_full_extract(work: Path) -> str | None:
    run = _quick_run(work)
    proc = _cli_limited(60_000, "extract", run, "--level", "0", "--index", "0", "--out", work / "x")
    if why := one_line_error(proc):
        return why
    return f"{work / 'x'} was left behind" if (work / "x").exists() else None


def _damaged_state(value: Callable[[dict], object]) -> Callable[[Path], str | None]:
    def check(work: Path) -> str | None:
        run = _quick_run(work)
        path = ckpt.current(run).state_json
        path.write_text(json.dumps(value(json.loads(path.read_text()))))
        return one_line_error(cli("train", "--out", run, "--resume", "--max-steps", "3", "--quiet"))
    return check


def _odd_out(make: Callable[[Path], Path]) -> Callable[[Path], str | None]:
    def check(work: Path) -> str | None:
        return one_line_error(cli("train", *QUICK, "--out", make(work)))
    return check


def _dangling(work: Path) -> Path:
    (work / "out").symlink_to(work / "nowhere" / "run")
    return work / "out"


def _loop(work: Path) -> Path:
    (work / "out").symlink_to(work / "out")
    return work / "out"


LAZY = """
import sys, fractalformer
try:
    fractalformer.load(sys.argv[1], level=1, index=0)
except fractalformer.FractalError as e:
    print(e)
    sys.exit(2)
"""


def bit_flip_lazy_load(work: Path) -> str | None:
    run = _quick_run(work, "family=fractal", "levels=2")
    path = ckpt.current(run).model
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x10
    path.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-c", LAZY, str(run)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 2 or "corrupt" not in proc.stdout:
        return f"a flipped bit was read without error (exit {proc.returncode})"
    return None


def resume_finished(work: Path) -> str | None:
    run = _quick_run(work)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*"))
    proc = cli("train", "--out", run, "--resume")
    if proc.returncode != 0 or "is complete" not in proc.stdout or proc.stdout.count("\n") != 1:
        return f"exit {proc.returncode}: {proc.stdout[-200:]}"
    after = sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*"))
    return None if after == before else "files changed"


def torchrun_one_voice(work: Path) -> str | None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "fractalformer", "train", "--preset", "tiny", "--max-steps", "2", "--set", "batch_size=8",
           "--set", "eval_batches=1", "--set", "final_eval=1", "--set", "sample_tokens=20",
           "--out", str(work / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    if proc.returncode:
        return f"exit {proc.returncode}: {proc.stderr[-200:]}"
    if proc.stdout.count("curves:") != 1 or proc.stdout.count("--- sample") != 1:
        return f"more than one rank reported: {proc.stdout.count('curves:')} curves lines"
    return None


CASES: list[Case] = [
    Case("dataloss", "kill -9 during checkpoints, then --resume", kill_during_checkpoints),
    Case("dataloss", "a second training into a running run's --out", second_writer),
    Case("dataloss", "SIGTERM saves like Ctrl-C", sigterm_saves),
    Case("dataloss", "a folder cut off before its first checkpoint", unfinished_folder),
    Case("dataloss", "disk full at the first checkpoint", disk_full_first_checkpoint),
    Case("dataloss", "disk full on --resume", disk_full_resume),
    Case("dataloss", "disk full in prepare", disk_full_prepare),
    Case("dataloss", "disk full in extract", disk_full_extract),
    Case("dataloss", "train_state.json is a list", _damaged_state(lambda s: [])),
    Case("dataloss", "train_state.json step is a string", _damaged_state(lambda s: {**s, "step": "abc"})),
    Case("dataloss", "train_state.json has no step",
         _damaged_state(lambda s: {k: v for k, v in s.items() if k != "step"})),
    Case("dataloss", "--out a dangling symlink", _odd_out(_dangling)),
    Case("dataloss", "--out a symlink loop", _odd_out(_loop)),
    Case("dataloss", "--out under /proc", _odd_out(lambda work: Path("/proc/fractalformer-hostile/run"))),
    Case("dataloss", "a flipped bit read by a sub-model load", bit_flip_lazy_load),
    Case("dataloss", "--resume of a finished run", resume_finished),
    Case("dataloss", "torchrun: rank 0 alone reports", torchrun_one_voice),
]
