"""Scale: gradient accumulation, deferred loss reads, and sharded (FSDP) training under torchrun."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fractalformer import checkpoint as ckpt
from fractalformer.cli import main
from fractalformer.models import GPT
from fractalformer.train import trainer as trainer_mod

from .conftest import TINY, losses, needs_torchrun, torchrun

SETS = ["--set", "batch_size=8", "--set", "sample_tokens=0", "--set", "final_eval=0", "--max-steps", "6"]


def assert_same_run(a: Path, b: Path) -> None:
    torch.testing.assert_close(torch.tensor(losses(b)), torch.tensor(losses(a)), rtol=1e-5, atol=1e-5)
    for name, tol in (("model", 1e-5), ("state", 1e-6)):
        # the generators: one per rank of the last run
        wa, wb = ({k: v for k, v in load_file(str(getattr(ckpt.current(r), name))).items()
                   if not k.startswith("rng.")} for r in (a, b))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k].float(), wa[k].float(), rtol=1e-4, atol=tol)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", *TINY, *SETS, "--out", str(out)]) == 0
    return out


def test_grad_accum_and_sync_every_keep_the_losses(single: Path, tmp_path: Path, monkeypatch) -> None:
    rows: list[int] = []

    class Counting(GPT):
        def forward(self, idx, levels=None, cache=None):
            if self.training:
                rows.append(idx.shape[0])
            return super().forward(idx, levels, cache)

    monkeypatch.setattr(trainer_mod, "build_model", Counting)
    out = tmp_path / "accum"
    assert main(["train", *TINY, *SETS, "--set", "grad_accum=4", "--set", "sync_every=4",
                 "--out", str(out)]) == 0
    assert rows == [2] * 24  # 6 steps of 4 micro-batches of 8 / 4 rows
    assert len(losses(out)) == 6
    assert_same_run(single, out)


@pytest.mark.slow
@needs_torchrun
def test_fsdp_matches_single_process_and_resumes_across_process_counts(single: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    torchrun(*TINY, *SETS, "--set", "parallel=fsdp", "--out", out, "--stop-after", "3", timeout=300)  # 1-3
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--stop-after", "2"]) == 0  # 4-5: one
    torchrun("--out", out, "--resume", "--quiet", timeout=300)  # 6: sharded, from a one-process checkpoint
    assert len(losses(out)) == 6
    assert_same_run(single, out)
