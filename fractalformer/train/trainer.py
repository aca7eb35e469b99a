"""The training loop: AdamW, warmup + cosine, clipping, periodic eval, checkpoints, DDP.

Every step's batch is a pure function of ``(seed, step)``; under DDP each rank takes its
contiguous share of that global batch. Hence a resumed run sees exactly the data the
uninterrupted run would have, and N processes see exactly the single-process batch.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import checkpoint as ckpt
from .. import hierarchy
from ..config import RunConfig
from ..data import Corpus, batch_generator, read_text, training_batch
from ..errors import FractalError
from ..evaluate import EvalRow, evaluate_full, fixed_val_batches, mean_losses, to_bpc
from ..models import build_model
from ..nn.product_keys import is_table
from ..tokenizers import Tokenizer, get_tokenizer
from .optim import Frozen, Optimizers

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
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``; both start
    at ``schedule_start`` (0, or where a merged run's full training begins)."""
    t = cfg.train
    step, horizon = step - t.schedule_start, t.max_steps - t.schedule_start
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, horizon - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer | Optimizers:
    """AdamW; matrices (and the tied embedding) decay, norm scales and biases do not.

    Expert / memory tables (``fractalformer.nn.product_keys``) get a group of their own:
    peak lr ``table_lr`` (scaled along the same schedule), no weight decay; with
    ``moe_sparse`` their sparse gradients go to ``SparseAdam``, which updates only the rows
    a step selected. With ``freeze=children`` the optimizer keeps the children's entries
    fixed (``Frozen``): only the glue between them trains.
    """
    if cfg.train.freeze != "none":
        from ..growth import frozen_masks

        return Frozen(_make_optimizer(model, cfg), frozen_masks(model))
    return _make_optimizer(model, cfg)


def _make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer | Optimizers:
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


def set_cpu_threads(local_world: int) -> None:
    """Share the cores among the processes on this machine instead of oversubscribing.

    An explicit ``OMP_NUM_THREADS`` wins (several runs side by side on one machine).
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        torch.set_num_threads(int(env))
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local_world))


def prepare_data(cfg: RunConfig, tok: Tokenizer | None = None) -> tuple[Tokenizer, Corpus]:
    text = read_text(cfg.train.data)
    if tok is None:
        tok = get_tokenizer(cfg.train.tokenizer, text)
    if tok.vocab_size != cfg.model.vocab_size:
        raise FractalError(f"vocab_size {cfg.model.vocab_size} does not match the {tok.name} "
                           f"tokenizer's {tok.vocab_size} tokens")
    return tok, Corpus.build(text, tok, cfg.model.block_size, cfg.train.on_unknown)


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
    has_run = (out / ckpt.CONFIG).exists()
    if resume and not has_run:
        raise FractalError(f"--resume: {out} holds no run to resume")
    if not resume and has_run:
        raise FractalError(f"{out} already holds a run; pass --resume to continue it or "
                           f"choose another --out")


def train(cfg: RunConfig, out: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train (or resume) the run in ``out``; returns the final step and validation figures."""
    out = Path(out)
    t = cfg.train
    device = pick_device(t.device)
    dd = setup_distributed(device)
    check_run_dir(out, resume)
    if dd.world > 1:
        dist.barrier()  # every rank has checked the folder before rank 0 writes to it
    if device == "cpu":
        set_cpu_threads(dd.local_world)
    if t.batch_size % dd.world:
        raise FractalError(f"batch_size {t.batch_size} is not divisible by {dd.world} processes")
    if dd.world > 1 and cfg.model.moe_sparse:
        raise FractalError("moe_sparse is single-process for now: DistributedDataParallel cannot "
                           "all-reduce the tables' sparse gradients (use moe_sparse=false under torchrun)")
    if dd.world > 1 and t.routing != "shared":
        raise FractalError(f"routing={t.routing} is single-process for now: under DDP each rank would "
                           "re-split its share of the rows (use routing=shared)")

    tok, corpus = prepare_data(cfg, ckpt.load_run_config(out)[1] if resume else None)
    shard, shards = t.shard()
    size = len(corpus.train) // shards
    train_ids = corpus.train[shard * size:(shard + 1) * size]
    if len(train_ids) < cfg.model.block_size + 1:
        raise FractalError(f"data_shard {t.data_shard} holds {len(train_ids)} tokens, fewer than "
                           f"block_size + 1")
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg)
    start, elapsed0 = 0, 0.0
    if resume:
        model_step = ckpt.load_model_state(out, model)
        info = ckpt.load_train_state(out, optimizer)
        start, elapsed0 = int(info["step"]), float(info.get("elapsed_s", 0.0))
        if model_step is not None and model_step != start:
            raise FractalError(f"{out}: model.safetensors (step {model_step}) and the training state "
                               f"(step {start}) are from different steps; the run was cut off mid-save")
        if dd.main:
            _start_metrics(out / "metrics.csv", metric_fields(cfg), keep_until=start)
            ckpt.save_run_config(out, cfg, tok)  # a changed --max-steps is the new horizon
    elif dd.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.save_run_config(out, cfg, tok)
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

    if dd.main:
        n = model.num_params()
        print(f"model: {n:,} parameters | data: {len(train_ids):,} train / {len(corpus.val):,} val "
              f"{tok.name} tokens | device: {device} x{dd.world} | run folder: {out}")
    bar = tqdm(total=t.max_steps, initial=start, disable=not (progress and dd.main),
               dynamic_ncols=True, unit="step")
    step, stopped, t0 = start, "done", time.perf_counter()
    log = _CsvLog(out / "metrics.csv", metric_fields(cfg)) if dd.main else contextlib.nullcontext()
    subs = cfg.model.sub_models()
    clip = clipped_params(model, cfg)
    with _StopFlag() as flag, log:
        model.train()
        while step < t.max_steps:
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            x, y = training_batch(train_ids, t.batch_size, cfg.model.block_size,
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
                if dd.main:
                    smallest = min(v for k, v in val.items()
                                   if k[0] == model.nest.levels - 1 and k[1] != "ensemble")
                    extra = (f" | smallest level best {smallest:.4f}" if len(subs) > 1 else "")
                    bar.write(f"step {step}: train {train_loss:.4f} | val {vl:.4f} nats/token, "
                              f"{to_bpc(vl, corpus.val_units_per_token):.3f} bits/{tok.unit}{extra}")
            if dd.main:
                log.writerow(row)
            bar.set_postfix(loss=f"{train_loss:.3f}",
                            tok_s=f"{(step - start) * tokens_per_step / (time.perf_counter() - t0):,.0f}")
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
    if stopped == "done" and dd.main:
        final = evaluate_full(model, corpus, cfg.model.block_size, device)
        if final[0].extra:
            ckpt.write_json(out / "expert_usage.json", final[0].extra)
        from ..analysis.plots import plot_curves

        plot_curves(out)
    if dd.world > 1:
        dist.barrier()
    return TrainResult(step, stopped, final)


class _CsvLog:
    def __init__(self, path: Path, fields: list[str]) -> None:
        self._f = path.open("a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=fields)

    def writerow(self, row: dict[str, Any]) -> None:
        self._w.writerow(row)
        self._f.flush()

    def __enter__(self) -> _CsvLog:
        return self

    def __exit__(self, *_: Any) -> None:
        self._f.close()


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
