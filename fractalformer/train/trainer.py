"""The training loop: AdamW, warmup + cosine, clipping, periodic eval, checkpoints, DDP.

Every step's batch is a pure function of ``(seed, step)``; under DDP each rank takes its
contiguous share of that global batch. Hence a resumed run sees exactly the data the
uninterrupted run would have, and N processes see exactly the single-process batch.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import checkpoint as ckpt
from .. import hierarchy
from ..config import RunConfig
from ..data import SHIPPED, Corpus, batch_generator, read_text, text_sha256, training_batch
from ..errors import FractalError
from ..evaluate import EvalRow, evaluate_full, fixed_val_batches, mean_losses, to_bpc
from ..models import build_model
from ..nn.product_keys import is_table
from ..prepare import is_prepared
from ..tokenizers import Tokenizer, get_tokenizer
from .optim import Optimizers

BASE_FIELDS = ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpc", "elapsed_s"]


def sub_name(level: int, index: int | str) -> str:
    return f"{level}.{'ens' if index == 'ensemble' else index}"


def metric_fields(cfg: RunConfig) -> list[str]:
    """metrics.csv columns: totals, then each sub-model's train and val loss when nested."""
    subs = cfg.model.sub_models()
    if len(subs) == 1:
        return BASE_FIELDS
    ens = [sub_name(lv, "ensemble") for lv in range(cfg.model.levels) if cfg.model.nesting().count(lv) > 1]
    return (BASE_FIELDS + [f"train_{sub_name(*k)}" for k in subs]
            + [f"val_{sub_name(*k)}" for k in subs] + [f"val_{e}" for e in ens])


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer | Optimizers:
    """AdamW; matrices (and the tied embedding) decay, norm scales and biases do not.

    Expert / memory tables (``fractalformer.nn.product_keys``) get a group of their own:
    peak lr ``table_lr`` (scaled along the same schedule), no weight decay; with
    ``moe_sparse`` their sparse gradients go to ``SparseAdam``, which updates only the rows
    a step selected.
    """
    t = cfg.train
    tables = [p for p in model.parameters() if is_table(p)]
    rest = [p for p in model.parameters() if not is_table(p)]
    groups: list[dict[str, Any]] = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    betas = (t.beta1, t.beta2)
    table_group = {"params": tables, "lr_scale": t.table_lr / t.lr if t.table_lr else 1.0}
    if not tables:
        return torch.optim.AdamW(groups, lr=t.lr, betas=betas, fused=False)
    if cfg.model.moe_sparse:
        return Optimizers(torch.optim.AdamW(groups, lr=t.lr, betas=betas, fused=False),
                          torch.optim.SparseAdam([table_group], lr=t.lr, betas=betas))
    return torch.optim.AdamW([*groups, {**table_group, "weight_decay": 0.0}], lr=t.lr, betas=betas,
                             fused=False)


def clipped_params(model: torch.nn.Module, cfg: RunConfig) -> list[torch.nn.Parameter]:
    """Parameters under global gradient clipping: all but sparse-gradient tables."""
    return [p for p in model.parameters() if not (cfg.model.moe_sparse and is_table(p))]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FractalError("device=cuda was asked for but CUDA is not available")
    return name


def set_cpu_threads(local_world: int, threads: int = 0) -> int:
    """Share this machine's CPU threads among its ``local_world`` processes; returns this one's.

    ``threads`` (the config key) is the machine's total, divided among the processes.
    Unset, an explicit ``OMP_NUM_THREADS`` is taken as this process's count (the variable's
    meaning; torchrun sets it per process), else the usable cores are divided.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if threads:
        n = max(1, threads // local_world)
    elif env.isdigit() and int(env) > 0:
        n = int(env)
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        n = max(1, cores // local_world)
    torch.set_num_threads(n)
    return n


def prepare_data(cfg: RunConfig, tok: Tokenizer | None = None,
                 expect_sha256: str | None = None) -> tuple[Tokenizer, Corpus]:
    """Tokenizer and corpus of ``cfg``'s text; with ``expect_sha256``, the text must be that one.

    ``data`` may be a ``fractalformer prepare`` folder: its ids are memory-mapped and
    its tokenizer is the one they were made with.
    """
    if is_prepared(cfg.train.data):
        saved, corpus = Corpus.prepared(str(cfg.train.data), cfg.model.block_size)
        if expect_sha256 and corpus.sha256 != expect_sha256:
            raise FractalError(f"prepared data {cfg.train.data} has changed since the run was trained on it")
        if tok is not None and tok.to_dict() != saved.to_dict():
            raise FractalError(f"{cfg.train.data} was prepared with the {saved.name} tokenizer, not this "
                               f"run's {tok.name}")
        if tok is None and saved.name != cfg.train.tokenizer:
            raise FractalError(f"{cfg.train.data} was prepared with the {saved.name} tokenizer; "
                               f"tokenizer={cfg.train.tokenizer} does not match it")
        _check_vocab(cfg, tok or saved)
        return tok or saved, corpus
    text = read_text(cfg.train.data)
    if expect_sha256 and text_sha256(text) != expect_sha256:
        raise FractalError(f"data file {cfg.train.data} has changed since the run was trained on it; its "
                           f"validation split would be other text (name a data file explicitly to score it)")
    if tok is None:
        tok = get_tokenizer(cfg.train.tokenizer, text)
    _check_vocab(cfg, tok)
    return tok, Corpus.build(text, tok, cfg.model.block_size, cfg.train.on_unknown)


def _check_vocab(cfg: RunConfig, tok: Tokenizer) -> None:
    if tok.vocab_size != cfg.model.vocab_size:
        why = f" (the model of --init-from {cfg.train.init_from})" if cfg.train.init_from else ""
        raise FractalError(f"vocab_size {cfg.model.vocab_size}{why} does not match the {tok.name} "
                           f"tokenizer's {tok.vocab_size} tokens")


def init_tokenizer(cfg: RunConfig) -> Tokenizer | None:
    """Fine-tuning keeps the tokenizer of the run it starts from unless another is named."""
    if not cfg.train.init_from:
        return None
    _, tok = ckpt.load_run_config(Path(cfg.train.init_from))
    if cfg.train.tokenizer != tok.name:
        return None
    return tok


def load_init(model: torch.nn.Module, run: Path) -> None:
    """Fine-tuning: the weights of ``run``, or one clear line on why they do not fit."""
    try:
        ckpt.load_model_state(run, model)
    except FractalError as e:
        raise FractalError(f"--init-from {run}: its weights do not fit this model ({e})") from None


def run_data(run_dir: str | Path, model: torch.nn.Module, data: str | None = None) -> Corpus:
    """The corpus a trained run is scored on: its own text, checked unchanged, or ``data``."""
    cfg = model.run_config
    if data is not None:
        return prepare_data(replace(cfg, train=replace(cfg.train, data=data)), model.tokenizer)[1]
    path = cfg.train.data
    if path not in (None, SHIPPED) and not Path(path).is_file() and not is_prepared(path):
        raise FractalError(f"the run's data file {path} is not found here; name the data file explicitly")
    return prepare_data(cfg, model.tokenizer, ckpt.load_data_sha256(Path(run_dir)))[1]


def absolute_data(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its data file as an absolute path, so the run folder works from anywhere."""
    if cfg.train.data in (None, SHIPPED):
        return cfg
    return replace(cfg, train=replace(cfg.train, data=str(Path(cfg.train.data).resolve())))


class _StopFlag:
    """First Ctrl-C asks the loop to save and stop at the end of the step; a second aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *_: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


@dataclass
class TrainResult:
    step: int
    stopped: str  # "done", "interrupted", "stop_after"
    final: list[EvalRow] | None  # one row per sub-model (the full model first)


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse a run folder that cannot be (re)used, before anything is written."""
    if out.exists() and not out.is_dir():
        raise FractalError(f"{out} is a file, not a run folder")
    has_run = (out / ckpt.CONFIG).exists()
    if resume and not has_run:
        raise FractalError(f"{out} holds no run to resume")
    if not resume and has_run:
        raise FractalError(f"{out} already holds a run; resume it or choose another run folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FractalError(f"cannot create run folder {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FractalError(f"cannot write run folder {out}: {existing} is not writable")


def _resume_note(saved: RunConfig, cfg: RunConfig, start: int) -> str:
    """What resuming at ``start`` does, or a FractalError when ``max_steps`` is behind it."""
    old, new = saved.train.max_steps, cfg.train.max_steps
    if new < start:
        raise FractalError(f"the run is at step {start}; max_steps {new} would end it before that")
    note = f"resuming from step {start} of {new}"
    if new != old:
        note += (f" (extended from {old}: the cosine schedule now decays over {new} steps, so the lr "
                 f"at step {start} is {lr_at(start, cfg):.3g} instead of {lr_at(start, saved):.3g})")
    return note


def _level_table(val: dict, widths: list[int]) -> list[str]:
    """Per-sub-model validation losses (nats/token), one compact line per level."""
    lines = []
    for lv, width in enumerate(widths):
        subs = [f"{v:.4f}" for k, v in val.items() if k[0] == lv and k[1] != "ensemble"]
        ens = val.get((lv, "ensemble"))
        tail = "" if ens is None else f" | ensemble {ens:.4f}"
        lines.append(f"  level {lv} (width {width}): " + " ".join(subs) + tail)
    return lines


def train(cfg: RunConfig, out: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train (or resume) the run in ``out``; returns the final step and validation figures."""
    out = Path(out)
    if not resume:
        cfg = absolute_data(cfg)
    t = cfg.train
    device = pick_device(t.device)
    dd = setup_distributed(device)
    check_run_dir(out, resume)
    if t.log == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise FractalError("log=tensorboard needs the tensorboard package: "
                           "pip install 'fractalformer[tensorboard]'")
    if dd.world > 1:
        dist.barrier()  # every rank has checked the folder before rank 0 writes to it
    if device == "cpu":
        set_cpu_threads(dd.local_world, t.threads)
    if t.max_steps < t.warmup_steps and dd.main:
        warnings.warn(f"max_steps ({t.max_steps}) is below warmup_steps ({t.warmup_steps}): the learning "
                      f"rate never reaches lr", stacklevel=2)
    if t.batch_size % dd.world:
        raise FractalError(f"batch_size {t.batch_size} is not divisible by {dd.world} processes")
    if dd.world > 1 and cfg.model.moe_sparse:
        raise FractalError("moe_sparse is single-process for now: DistributedDataParallel cannot "
                           "all-reduce the tables' sparse gradients (use moe_sparse=false under torchrun)")
    if dd.world > 1 and t.routing != "shared":
        raise FractalError(f"routing={t.routing} is single-process for now: under DDP each rank would "
                           "re-split its share of the rows (use routing=shared)")

    saved = ckpt.load_run_config(out) if resume else None
    tok, corpus = prepare_data(cfg, saved[1] if saved else init_tokenizer(cfg),
                               ckpt.load_data_sha256(out) if resume else None)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    if t.init_from and not resume:
        load_init(model, Path(t.init_from))
    optimizer = make_optimizer(model, cfg)
    start, elapsed0 = 0, 0.0
    if resume:
        model_step = ckpt.load_model_state(out, model)
        info = ckpt.load_train_state(out, optimizer)
        start, elapsed0 = int(info["step"]), float(info.get("elapsed_s", 0.0))
        if model_step is not None and model_step != start:
            raise FractalError(f"{out}: model.safetensors (step {model_step}) and the training state "
                               f"(step {start}) are from different steps; the run was cut off mid-save")
        note = _resume_note(saved[0], cfg, start)
        if dd.main:
            if progress:
                print(note)
            _start_metrics(out / "metrics.csv", metric_fields(cfg), keep_until=start)
            ckpt.save_run_config(out, cfg, tok, corpus.sha256)  # a changed max_steps is the new horizon
    elif dd.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.save_run_config(out, cfg, tok, corpus.sha256)
        _start_metrics(out / "metrics.csv", metric_fields(cfg))

    use_bf16 = t.dtype == "bfloat16" or (device == "cuda" and t.dtype == "auto")
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext())
    fwd = torch.compile(model) if t.compile else model
    if dd.world > 1:
        ids = [torch.cuda.current_device()] if device == "cuda" else None
        fwd = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=ids)

    if t.groups or t.emergent_every:
        widths = [model.level_width(lv) for lv in range(model.nest.levels)]
        model.set_groups(hierarchy.initial_groups(out, tok, t.groups, widths, start if resume else None,
                                                  write=dd.main))
    val_batches = fixed_val_batches(corpus, t.eval_batches, t.batch_size, cfg.model.block_size, t.seed)
    local_b = t.batch_size // dd.world
    tokens_per_step = t.batch_size * cfg.model.block_size

    def save(step: int, elapsed: float) -> None:
        if dd.main:
            ckpt.save_model(out, model, step)
            ckpt.save_train_state(out, optimizer, {"step": step, "elapsed_s": elapsed})

    if dd.main and progress:
        n = model.num_params()
        print(f"model: {n:,} parameters | data: {len(corpus.train):,} train / {len(corpus.val):,} val "
              f"{tok.name} tokens | device: {device} x{dd.world} | run folder: {out}")
    bar = tqdm(total=t.max_steps, initial=start, disable=not (progress and dd.main),
               dynamic_ncols=True, unit="step")
    step, stopped, t0 = start, "done", time.perf_counter()
    last = t0
    log = (_CsvLog(out / "metrics.csv", metric_fields(cfg), tensorboard_writer(cfg, out, start)) if dd.main
           else contextlib.nullcontext())
    subs = cfg.model.sub_models()
    clip = clipped_params(model, cfg)
    with _StopFlag() as flag, log:
        model.train()
        while step < t.max_steps:
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            x, y = training_batch(corpus.train, t.batch_size, cfg.model.block_size,
                                  batch_generator(t.seed, step), t.routing, model.nest)
            rows = slice(dd.rank * local_b, (dd.rank + 1) * local_b)
            x, y = x[..., rows, :].to(device), y[..., rows, :].to(device)
            with autocast:
                _, loss, sub_losses = fwd(x, y)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(clip, t.grad_clip)
            stats = torch.cat([loss.detach().float().view(1), sub_losses.float(),
                               torch.tensor([float(flag.requested)], device=loss.device)])
            if dd.world > 1:
                dist.all_reduce(stats)
                stats[:-1] /= dd.world
            stats = stats.cpu()
            train_loss = float(stats[0])
            if not math.isfinite(train_loss):
                bar.close()
                raise FractalError(f"training loss became {train_loss} at step {step + 1}; stopped. "
                                   f"The last good checkpoint in {out} is kept (lower lr or grad_clip)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = elapsed0 + time.perf_counter() - t0
            row: dict[str, Any] = {"step": step, "tokens": step * tokens_per_step, "lr": f"{lr:.6g}",
                                   "train_loss": f"{train_loss:.6f}", "elapsed_s": f"{elapsed:.2f}"}
            if len(subs) > 1:
                row |= {f"train_{sub_name(*k)}": f"{float(v):.6f}"
                        for k, v in zip(subs, stats[1:-1], strict=True)}
            if step % t.eval_every == 0 or step == t.max_steps:
                val, _ = mean_losses(model, val_batches, device, autocast)
                vl = val[(0, 0)]
                row |= {"val_loss": f"{vl:.6f}", "val_bpc": f"{to_bpc(vl, corpus.val_units_per_token):.4f}"}
                if len(subs) > 1:
                    row |= {f"val_{sub_name(*k)}": f"{v:.6f}" for k, v in val.items()}
                if dd.main and progress:
                    full = float(stats[1]) if len(subs) > 1 else train_loss  # like with like
                    bar.write(f"step {step}: full model train {full:.4f} | val {vl:.4f} nats/token, "
                              f"{to_bpc(vl, corpus.val_units_per_token):.3f} bits/{tok.unit}")
                    if len(subs) > 1:
                        widths = [model.level_width(lv) for lv in range(model.nest.levels)]
                        for line in _level_table(val, widths):
                            bar.write(line)
            if dd.main:
                log.writerow(row)
            now = time.perf_counter()
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{tokens_per_step / (now - last):,.0f}")  # this step's, not the mean
            last = now
            bar.update(1)
            if t.emergent_every and step % t.emergent_every == 0 and step < t.max_steps:
                groups = hierarchy.recluster(model, tok, t.cluster_method, t.cluster_eps,
                                             t.cluster_min_samples)
                model.set_groups(groups)
                if dd.main:
                    hierarchy.log_clustering(out, step, groups, tok, t.cluster_method)
            if step % t.ckpt_every == 0 or step == t.max_steps:
                save(step, elapsed)
            if stats[-1] > 0:
                stopped = "interrupted"
                break
            if stop_after is not None and step - start >= stop_after:
                stopped = "stop_after"
                break
    bar.close()
    if stopped != "done" or step % t.ckpt_every:
        save(step, elapsed0 + time.perf_counter() - t0)
    final = None
    if dd.main:
        from ..analysis.plots import plot_curves

        plot_curves(out)
    if stopped == "done" and dd.main and t.final_eval:
        final = evaluate_full(model, corpus, cfg.model.block_size, device, windows_limit=t.final_eval,
                              progress=progress)
        if final[0].extra:
            ckpt.write_json(out / "expert_usage.json", final[0].extra)
    if dd.world > 1:
        dist.barrier()
    return TrainResult(step, stopped, final)


class _CsvLog:
    """metrics.csv, and with ``log=tensorboard`` the same figures as TensorBoard scalars."""

    def __init__(self, path: Path, fields: list[str], tensorboard: Any = None) -> None:
        self._f = path.open("a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=fields)
        self._tb = tensorboard
        self._last: tuple[float, float] | None = None  # (tokens, elapsed) of the previous row

    def writerow(self, row: dict[str, Any]) -> None:
        self._w.writerow(row)
        self._f.flush()
        if self._tb is None:
            return
        step, tokens, elapsed = int(row["step"]), float(row["tokens"]), float(row["elapsed_s"])
        for key, value in row.items():
            if key.startswith(("train_", "val_")) and value != "":
                self._tb.add_scalar(key.replace("_", "/", 1), float(value), step)
        self._tb.add_scalar("lr", float(row["lr"]), step)
        if self._last is not None and elapsed > self._last[1]:
            self._tb.add_scalar("tokens_per_s", (tokens - self._last[0]) / (elapsed - self._last[1]), step)
        self._last = (tokens, elapsed)

    def __enter__(self) -> _CsvLog:
        return self

    def __exit__(self, *_: Any) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def tensorboard_writer(cfg: RunConfig, out: Path, start: int) -> Any:
    """A TensorBoard ``SummaryWriter`` for ``RUN/tensorboard`` (None unless ``log=tensorboard``);
    a resumed run drops the events logged after its checkpoint (``purge_step``)."""
    if cfg.train.log != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"), purge_step=start or None)


def _start_metrics(path: Path, fields: list[str], keep_until: int | None = None) -> None:
    """Write the header, keeping earlier rows up to step ``keep_until`` when resuming.

    Rows logged after the last checkpoint are dropped: the resumed run recomputes them.
    """
    rows: list[dict[str, str]] = []
    if keep_until is not None and path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()
                    and int(r["step"]) <= keep_until]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    ckpt.atomic_write(path, write)
