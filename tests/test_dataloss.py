"""Run folders survive kills, faults and a second writer: checkpoints are one unit, a run
folder has one writer, a full disk costs nothing already saved, damaged files are one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fractalformer
from fractalformer import FractalError
from fractalformer import checkpoint as ckpt

from .conftest import TINY, losses, needs_torchrun, run_cli, torchrun
from .test_cli import assert_one_line_error

QUICK = [*TINY, "--max-steps", "2", "--set", "sample_tokens=0", "--set", "eval_batches=1",
         "--set", "final_eval=0"]
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _toy() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()


def _saved(run: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """The current checkpoint's step and weights, read as resume reads them (both files)."""
    model, opt = _toy()
    model_step = ckpt.load_model_state(run, model)
    info = ckpt.load_train_state(run, opt)
    assert model_step == info["step"]
    return info["step"], {k: v.clone() for k, v in model.state_dict().items()}


# the file-system calls a save makes
_CALLS = [(os, "replace"), (os, "fsync"), (os, "chmod"), (os, "unlink"), (ckpt, "save_file"),
          (ckpt.tempfile, "mkstemp"), (ckpt.tempfile, "mkdtemp"), (ckpt.shutil, "rmtree"),
          (Path, "write_text")]


def _die_at(n: int) -> None:
    """Make this process die like SIGKILL (no cleanup, no flush) at its n-th file-system call."""
    count = [0]

    def dying(f):
        def call(*a, **k):
            if count[0] == n:
                os._exit(9)
            count[0] += 1
            return f(*a, **k)
        return call

    for owner, name in _CALLS:
        setattr(owner, name, dying(getattr(owner, name)))


@needs_fork
def test_a_kill_at_any_point_of_a_save_leaves_a_whole_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _toy()
    _step(model, opt)
    ckpt.save_checkpoint(run, dict(model.state_dict()), opt, {"step": 1, "elapsed_s": 0.0})
    old = _saved(run)[1]
    _step(model, opt)
    new = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(200):
        pid = os.fork()
        if pid == 0:
            _die_at(n)
            ckpt.save_checkpoint(run, new, opt, {"step": 2, "elapsed_s": 1.0})
            os._exit(0)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        step, weights = _saved(run)
        want = new if step == 2 else old
        assert step in (1, 2) and all(torch.equal(weights[k], want[k]) for k in want), n
        if code == 0:
            assert step == 2 and n > 5  # the save completed: every earlier point was a kill
            break
        ckpt.save_checkpoint(run, old, opt, {"step": 1, "elapsed_s": 0.0})  # each kill starts from step 1
    else:
        pytest.fail("the save never completed")
    assert len(list((run / ckpt.CHECKPOINTS).iterdir())) == 1  # half-written folders removed


def _wait_for(predicate, what: str, proc: subprocess.Popen) -> None:
    for _ in range(1200):  # up to two minutes
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the training ended before {what}: {proc.stderr.read()[-500:]}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _step_on_disk(run: Path) -> int:
    try:
        return ckpt.read_train_info(run)["step"]
    except FractalError:
        return -1


def _train(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fractalformer", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


LONG = [*TINY, "--max-steps", "100000", "--set", "ckpt_every=1", "--set", "eval_every=100000",
        "--set", "sample_tokens=0", "--set", "final_eval=0"]


@pytest.mark.slow
def test_sigkill_at_many_moments_never_makes_a_run_unresumable(tmp_path: Path) -> None:
    out = tmp_path / "run"
    steps = []
    for i in range(8):  # killed at a different moment of its step (and of its save) each time
        proc = _train(*(LONG if i == 0 else ["--resume", "--quiet"]), "--out", out)
        last = max(steps, default=0)
        _wait_for(lambda last=last: _step_on_disk(out) >= last + 2, "two more checkpoints", proc)
        time.sleep(0.004 * i)
        proc.kill()
        proc.communicate()
        steps.append(_step_on_disk(out))
        assert steps[-1] >= last + 2
    proc = subprocess.run([sys.executable, "-m", "fractalformer", "train", "--out", str(out), "--resume",
                           "--quiet", "--stop-after", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ckpt.read_train_info(out)["step"] == steps[-1] + 1
    assert len(losses(out)) == steps[-1] + 1
    assert len(list((out / ckpt.CHECKPOINTS).iterdir())) == 1


@pytest.mark.slow
def test_sigterm_saves_and_stops_like_ctrl_c(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _train(*LONG, "--set", "ckpt_every=100000", "--out", out)
    metrics = out / "metrics.csv"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) > 3, "a few steps", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    step = int(stdout.split("interrupted at step ")[1].split(";")[0])
    assert ckpt.read_train_info(out)["step"] == step == len(losses(out))


@pytest.mark.slow
def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path, tiny_run: Path) -> None:
    out = tmp_path / "run"
    first = _train(*LONG, "--out", out)
    try:
        _wait_for(lambda: _step_on_disk(out) >= 1, "a first checkpoint", first)
        for args in (["train", "--resume"], ["train", *QUICK], ["extract", str(tiny_run), "--level", "0",
                     "--index", "0"], ["grow", str(tiny_run), "--width", "2"]):
            proc = subprocess.run([sys.executable, "-m", "fractalformer", *args, "--out", str(out)],
                                  capture_output=True, text=True)
            assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            assert f"in use by another fractalformer process (PID {first.pid})" in proc.stderr
    finally:
        first.kill()
        first.communicate()
    proc = subprocess.run([sys.executable, "-m", "fractalformer", "train", "--out", str(out), "--resume",
                           "--quiet", "--stop-after", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # a killed holder leaves no lock behind


def test_lock_is_exclusive_and_reentrant(tmp_path: Path) -> None:
    tmp_path.joinpath("run").mkdir()
    with ckpt.run_lock(tmp_path / "run"), ckpt.run_lock(tmp_path / "run"):  # merge trains what it writes
        code = ("import sys; from fractalformer import checkpoint as c\n"
                "with c.run_lock(sys.argv[1]): pass")
        cmd = [sys.executable, "-c", code, str(tmp_path / "run")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert f"(PID {os.getpid()})" in proc.stderr and proc.returncode != 0
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_run_cut_off_before_its_first_checkpoint_is_taken_over(capsys, tmp_path: Path, tiny_run: Path,
                                                                 monkeypatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_run / "config.json", out)  # what a kill before the first checkpoint leaves
    (out / "metrics.csv").write_text("step\n1\n2\n3\n")
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume")
    assert_one_line_error(code, err, "holds no checkpoint to resume: the run stopped before its first one")
    assert run_cli(capsys, "train", *QUICK, "--out", out)[0] == 0
    assert ckpt.read_train_info(out)["step"] == 2 and len(losses(out)) == 2
    # a failure before the first checkpoint removes the folder it made
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(FractalError("boom")))
    code, _, err = run_cli(capsys, "train", *QUICK, "--out", tmp_path / "new")
    assert_one_line_error(code, err, "boom")
    assert not (tmp_path / "new").exists()


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every safetensors write runs out of space half-way."""
    def save(tensors: dict, path: str, metadata: dict | None = None) -> None:
        Path(path).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", save)


def _hidden(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name != ".lock"]


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(capsys, tmp_path: Path, tiny_run: Path,
                                                                monkeypatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = ckpt.current(run)
    _full_disk(monkeypatch)
    code, _, err = run_cli(capsys, "train", *QUICK, "--out", tmp_path / "first")
    assert_one_line_error(code, err, "No space left on device")
    assert not (tmp_path / "first").exists()
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--max-steps", "21", "--quiet")
    assert_one_line_error(code, err, f"No space left on device); the previous checkpoint in {run} is kept")
    assert ckpt.current(run) == before and _saved_step(run) == 20
    assert [p.name for p in (run / ckpt.CHECKPOINTS).iterdir()] == [before.folder.name] and not _hidden(run)
    code, _, err = run_cli(capsys, "extract", run, "--level", "0", "--index", "0", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "No space left on device")
    assert not (tmp_path / "x").exists()
    monkeypatch.undo()
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    text = tmp_path / "t.txt"
    text.write_bytes(b"hello world " * 100)
    code, _, err = run_cli(capsys, "prepare", text, "--out", tmp_path / "p", "--quiet")
    assert_one_line_error(code, err, "No space left on device")
    assert not (tmp_path / "p").exists() and not _hidden(tmp_path)


def _saved_step(run: Path) -> int:
    return ckpt.load_model_state(run, fractalformer.load(run).model)


@pytest.mark.parametrize("state, match", [
    ([], "is damaged (not a JSON object)"),
    ({"step": "abc"}, "step 'abc' is not a whole number"),
    ({"elapsed_s": 1.0}, "is damaged (it has no step)"),
    ({"step": -3}, "step -3 is not a whole number"),
    ({"step": 20, "elapsed_s": "x"}, "elapsed_s 'x' is not a number"),
])
def test_damaged_train_state_json_is_one_line(capsys, tmp_path: Path, tiny_run: Path, state, match) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = ckpt.current(run).state_json
    groups = json.loads(path.read_text())["param_groups"]
    path.write_text(json.dumps(state if not isinstance(state, dict) else {"param_groups": groups, **state}))
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--max-steps", "21", "--quiet")
    assert_one_line_error(code, err, match)


def test_odd_out_folders_are_one_line(capsys, tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for out, match in ((tmp_path / "dangling", "is a symbolic link to nothing"),
                       (tmp_path / "loop", "is a symbolic link to nothing"),
                       (tmp_path / "loop" / "run", "is a symbolic link to nothing"),
                       (Path("/proc/fractalformer-run"), "/proc/fractalformer-run")):
        code, _, err = run_cli(capsys, "train", *QUICK, "--out", out)
        assert_one_line_error(code, err, match)
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "dangling", "--resume")
    assert_one_line_error(code, err, "is a symbolic link to nothing")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / ckpt.POINTER).write_text('{"folder": "../../etc"}')
    with pytest.raises(FractalError, match="is damaged"):
        ckpt.current(tmp_path / "run")


def _flip(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_sub_model_load_checks_what_it_reads(fractal_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fractal_run, run)
    path = ckpt.current(run).model
    good = fractalformer.load(run, level=1, index=0).model
    _flip(path, 1000)
    with pytest.raises(FractalError, match=r"is corrupt \(tensor .* does not match the checksum"):
        fractalformer.load(run, level=1, index=0)
    # a file of an earlier version: one checksum of the whole contents, checked whole
    state = load_file(str(ckpt.current(fractal_run).model))
    save_file(state, str(path), metadata={"step": "40", "sha256": ckpt.tensors_sha256(state)})
    alone = fractalformer.load(run, level=1, index=0).model
    assert all(torch.equal(v, good.state_dict()[k]) for k, v in alone.state_dict().items())
    _flip(path, 1000)
    with pytest.raises(FractalError, match="its contents do not match the checksum"):
        fractalformer.load(run, level=1, index=0)
    save_file(state, str(path), metadata={"step": "40"})  # before checksums: read as it is
    fractalformer.load(run, level=1, index=0)


def test_run_folders_of_earlier_versions_load_and_resume(capsys, tmp_path: Path, tiny_run: Path) -> None:
    run = tmp_path / "old"
    shutil.copytree(tiny_run, run)
    folder = ckpt.current(run).folder
    for name in (ckpt.MODEL, ckpt.STATE, ckpt.STATE_JSON):  # the layout of earlier versions
        state = load_file(str(folder / name)) if name.endswith(".safetensors") else None
        if state is None:
            shutil.copy(folder / name, run / name)
        else:
            meta = {"sha256": ckpt.tensors_sha256(state), **({"step": "20"} if name == ckpt.MODEL else {})}
            save_file(state, str(run / name), metadata=meta)
    shutil.rmtree(run / ckpt.CHECKPOINTS)
    (run / ckpt.POINTER).unlink()
    assert ckpt.current(run).folder == run
    assert run_cli(capsys, "eval", run)[0] == 0
    assert run_cli(capsys, "train", "--out", run, "--resume", "--max-steps", "21", "--quiet")[0] == 0
    assert ckpt.read_train_info(run)["step"] == 21 and not (run / ckpt.MODEL).exists()


def test_resuming_a_finished_run_does_nothing(capsys, tiny_run: Path) -> None:
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tiny_run.rglob("*"))
    code, out, err = run_cli(capsys, "train", "--out", tiny_run, "--resume")
    assert code == 0 and err == ""
    assert out.strip() == f"the run in {tiny_run} is complete (step 20 of 20); nothing to do (extend it " \
                          "with --resume --max-steps N)"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tiny_run.rglob("*")) == before


@pytest.mark.slow
@needs_torchrun
def test_under_torchrun_rank_0_alone_reports(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--set", "batch_size=8", "--set", "eval_batches=1", "--set", "final_eval=1",
            "--set", "sample_tokens=20", "--max-steps", "3", "--out", out]
    stopped = torchrun(*args, "--stop-after", "1").stdout
    assert stopped.count("stopped at step 1;") == 1, stopped
    done = torchrun("--out", out, "--resume").stdout
    assert done.count("curves:") == 1 and done.count("--- sample") == 1, done
    assert torchrun("--out", out, "--resume").stdout.count("is complete") == 1
