from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fractalformer
from fractalformer import checkpoint as ckpt
from fractalformer.cli import main
from fractalformer.config import build_config
from fractalformer.models import GPT
from fractalformer.train import lr_at
from fractalformer.train import trainer as trainer_mod

from .conftest import TINY, assert_two_processes_match_one, losses, needs_torchrun


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    cfg = build_config(None, None, ["lr=0.01", "min_lr=0.001", "warmup_steps=10", "max_steps=110"])
    assert lr_at(0, cfg) == pytest.approx(0.001)
    assert lr_at(9, cfg) == pytest.approx(0.01)
    assert lr_at(60, cfg) == pytest.approx(0.0055)
    assert lr_at(110, cfg) == pytest.approx(0.001)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_losses(tmp_path: Path) -> None:
    sets = ["--set", "eval_every=3", "--set", "ckpt_every=100", "--set", "sample_tokens=0"]
    assert main(["train", *TINY, *sets, "--max-steps", "12", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *TINY, *sets, "--max-steps", "12", "--out", str(tmp_path / "b"),
                 "--stop-after", "5"]) == 0
    assert len(losses(tmp_path / "b")) == 5
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--quiet", "--stop-after", "4"]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--quiet"]) == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 12
    assert a == b
    wa, wb = (load_file(str(ckpt.current(tmp_path / r).model)) for r in "ab")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_checkpoint_round_trip(tiny_run: Path) -> None:
    trained = fractalformer.load(tiny_run)
    model = trained.model
    assert trained.tokenizer.name == "bpe128" and model.config.n_layer == 2
    assert not model.training
    current = ckpt.current(tiny_run)
    saved = load_file(str(current.model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])
    for path in (tiny_run / "config.json", tiny_run / "metrics.csv", tiny_run / "curves.png",
                 current.state_json, current.state):
        assert path.is_file(), path
    assert [p.name for p in (tiny_run / "checkpoints").iterdir()] == [current.folder.name]  # the last alone
    hidden = [p.name for p in [*tiny_run.iterdir(), *current.folder.iterdir()] if p.name.startswith(".")]
    assert hidden == [".lock"]  # no temp files left


def test_training_reduces_loss(tiny_run: Path) -> None:
    with (tiny_run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert float(rows[0]["train_loss"]) > 4.5 and val[-1] < val[0] < 4.6


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    calls = {"n": 0}

    class Exploding(GPT):
        def forward(self, idx, levels=None, cache=None):
            logits = super().forward(idx, levels, cache)
            if self.training:
                calls["n"] += 1
                if calls["n"] == 7:
                    logits = {lv: lg * float("nan") for lv, lg in logits.items()}
            return logits

    monkeypatch.setattr(trainer_mod, "build_model", Exploding)
    out = tmp_path / "nan"
    code = main(["train", *TINY, "--set", "ckpt_every=5", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "loss became nan at step 7" in err and len(err.strip().splitlines()) == 1
    state = load_file(str(ckpt.current(out).model))
    assert state and ckpt.read_train_info(out)["step"] == 5
    for v in state.values():
        assert torch.isfinite(v).all()


@pytest.mark.slow
def test_ctrl_c_saves_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "fractalformer", "train", *TINY, "--max-steps", "100000",
           "--set", "ckpt_every=100000", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.csv"
    for _ in range(600):  # wait (up to a minute) until a few steps are logged
        if metrics.is_file() and len(metrics.read_text().splitlines()) > 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "--resume" in stdout
    step = int(stdout.split("at step ")[1].split(";")[0])
    assert step == len(losses(out))
    assert ckpt.read_train_info(out)["step"] == step


@pytest.mark.slow
@needs_torchrun
def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    sets = ["--set", "batch_size=8", "--set", "sample_tokens=0", "--max-steps", "6"]
    runs = assert_two_processes_match_one(tmp_path, *TINY, *sets, rtol=1e-4, atol=1e-5, loss_tol=1e-5)
    # each rank draws its own dropout masks and keeps its own generator state for --resume
    single, state = (load_file(str(ckpt.current(r).state)) for r in runs)
    assert not torch.equal(state["rng.torch.0"], state["rng.torch.1"])
    assert torch.equal(state["rng.torch.0"], single["rng.torch.0"])  # rank 0: the single-process stream


def test_metrics_column_names_read_back() -> None:
    from fractalformer.train.logs import metric_fields, parse_sub_name, sub_name

    cfg = build_config("tiny-fractal")
    subs = [*cfg.model.sub_models(), (1, "ensemble"), (2, "ensemble")]
    assert [parse_sub_name(sub_name(lv, j)) for lv, j in subs] == subs
    val = [parse_sub_name(f[len("val_"):]) for f in metric_fields(cfg) if f.startswith("val_")]
    assert [v for v in val if v is not None] == subs  # val_loss and val_bpc are not sub-models
    assert all(parse_sub_name(x) is None for x in ("loss", "\u00b2.1", "1.x", "", "1."))
