"""The harness shared by the speed benchmarks (``bench/``) and the training studies
(``experiments/``): the machine description printed with every figure, the timer, and the
experiments' argument parsing and run / store / report loop.

Both folders are packages run from the repository root, e.g. ``python -m bench.bench_train``
or ``python -m experiments.fractal_experiment``; they import this package as ``harness``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import fractalformer
from fractalformer.config import RunConfig
from fractalformer.data.corpus import Corpus, batch_generator, get_batch
from fractalformer.models import build_model
from fractalformer.runs import prepare_data
from fractalformer.train import TrainResult, train
from fractalformer.train.losses import training_loss


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
            f"{gpu}, Python {platform.python_version()}")


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds over ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- the experiment scripts' shared loop: train a named variant once, keep its result ----------

def cached_result(folder: Path, compute: Callable[[], dict]) -> dict:
    """The result stored in ``folder/eval.json`` by an earlier run (finished runs are skipped
    when an experiment is re-run), else ``compute()``'s, stored there; a folder left half
    written by an interrupted run is cleared first."""
    done = folder / "eval.json"
    if done.is_file():
        return json.loads(done.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    result = compute()
    done.write_text(json.dumps(result, indent=1))
    return result


def timed_train(cfg: RunConfig, folder: Path) -> tuple[TrainResult, float]:
    """Train ``cfg`` into ``folder`` quietly; the result and the wall time in seconds."""
    t0 = time.perf_counter()
    res = train(cfg, folder, progress=False)
    return res, round(time.perf_counter() - t0, 1)


def read_metrics(folder: Path) -> list[dict[str, str]]:
    """The rows of a run's ``metrics.csv`` (validation columns are empty between evaluations)."""
    with (folder / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def finished(root: Path, names: Iterable[str]) -> dict[str, dict]:
    """The stored results of the variants in ``names`` that have finished under ``root``."""
    done = {n: root / n / "eval.json" for n in names}
    return {n: json.loads(f.read_text()) for n, f in done.items() if f.is_file()}


def write_tables(stem: Path, results: dict[str, dict], text: str) -> None:
    """An experiment's results as ``<stem>.json`` and its table as ``<stem>.md``."""
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(text)


def script_parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser of a bench or experiment script: its docstring (what it measures,
    the command) is the ``--help`` text, as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def experiment_parser(doc: str, steps: int, out: str, names: list[str]) -> argparse.ArgumentParser:
    """The options every experiment script shares: steps, run folder, a subset of its
    variants, the results folder, and rebuilding the tables from finished runs."""
    ap = script_parser(doc)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--out", default=out)
    ap.add_argument("--only", nargs="*", choices=names, help="run only these names")
    ap.add_argument("--docs", default="docs/results", help="folder of the result tables")
    ap.add_argument("--report", action="store_true", help="only rebuild the table from finished runs")
    return ap


def data_sets(folder: str | Path) -> list[str]:
    """The config keys that train on a prepared corpus: its folder, tokenizer and vocabulary."""
    tok, _ = Corpus.prepared(str(folder), 2)
    return [f"data={folder}", f"tokenizer={tok.name}", f"vocab_size={tok.vocab_size}"]


def step_flops(cfg: RunConfig, folder: Path | None = None) -> int:
    """FLOPs of one training step (forward + backward, torch's FlopCounterMode) on the first
    batch of ``cfg``'s data, of a new model of ``cfg`` or the one trained in ``folder`` (a
    model with variable chunks costs what the chunks it makes cost)."""
    _, corpus = prepare_data(cfg)
    t = cfg.train
    x, y = get_batch(corpus.train, t.batch_size, cfg.model.block_size, batch_generator(t.seed, 0))
    torch.manual_seed(0)
    model = (build_model(cfg.model) if folder is None else fractalformer.load(folder).model).train()
    with FlopCounterMode(display=False) as counter:
        loss, _ = training_loss(model, model(x), y)
        loss.backward()
    return int(counter.get_total_flops())
