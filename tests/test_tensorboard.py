"""log=tensorboard: every metrics.csv figure, plus tokens/s, as TensorBoard scalars."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from .conftest import run_cli

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_tensorboard_scalars_match_metrics(tmp_path: Path, excerpt: Path, capsys) -> None:
    out, data = tmp_path / "run", excerpt  # a short text: a quick final evaluation
    code, _, err = run_cli(capsys, "train", "--preset", "tiny-fractal", "--quiet", "--out", out,
                           "--data", data, "--max-steps", "4", "--set", "eval_every=2",
                           "--set", "sample_tokens=0", "--set", "log=tensorboard")
    assert code == 0, err
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    subs = ["0.0", "1.0", "1.1", "2.0", "2.1", "2.2", "2.3"]
    assert {"train/loss", "val/loss", "val/bpc", "lr", "tokens_per_s"} <= tags
    assert {f"train/{s}" for s in subs} | {f"val/{s}" for s in subs} | {"val/1.ens", "val/2.ens"} <= tags
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    want = [float(r["train_loss"]) for r in rows]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(want)
    assert [e.value for e in acc.Scalars("val/2.3")] == pytest.approx(
        [float(r["val_2.3"]) for r in rows if r["val_2.3"]])
    assert len(acc.Scalars("tokens_per_s")) == 3 and all(e.value > 0 for e in acc.Scalars("tokens_per_s"))
