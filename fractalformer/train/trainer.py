"""The training loop: steps, periodic evaluation and checkpoints, stopping and resuming.

Every step's batch is a pure function of ``(seed, step)``; under torchrun each rank takes
its contiguous share of that global batch, and with ``grad_accum`` each micro-batch its
contiguous share of that. Hence a resumed run sees exactly the data the uninterrupted run
would have, and N processes see exactly the single-process batch. Checkpoints hold whole
tensors whatever the number of processes (a sharded run gathers them), so a run resumes
under any number of processes.

Pieces, in the order a step uses them: :func:`setup` (checks, data, model, optimizer, run
folder), :func:`set_lr`, :func:`train_step` (micro-batches, backward, clipping, optimizer),
:func:`flush` (losses to the host every ``sync_every`` steps), :func:`evaluate`, the
callbacks (re-clustering token groups), :func:`save`; :func:`train` is the loop that calls
them. The losses live in ``losses.py``, the optimizer in ``optim.py``, process groups in
``distributed.py``, the metrics log in ``logs.py`` (its picture in ``curves.py``) and run
folders in ``fractalformer.runs``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .. import checkpoint as ckpt
from .. import hierarchy
from ..config import RunConfig
from ..data.corpus import Corpus, Ids, batch_generator, training_batch
from ..data.tokenizers import Tokenizer
from ..device import autocast, keep_freed_memory, pick_device, set_cpu_threads
from ..errors import FractalError
from ..evaluate import EvalRow, closing_windows, evaluate_full, fixed_val_batches, mean_losses, to_bpc
from ..io import write_json
from ..models import build_model
from ..runs import (
    absolute_data,
    check_run_dir,
    claim_run_dir,
    init_tokenizer,
    load_data_sha256,
    load_init,
    load_run_config,
    prepare_data,
    save_run_config,
)
from .callbacks import callbacks
from .curves import plot_curves
from .distributed import Dist, check_parallel, setup_distributed, shard_like, whole
from .logs import (
    FULL_TRAIN,
    MetricsLog,
    level_table,
    metric_fields,
    start_metrics,
    sub_name,
    tensorboard_writer,
)
from .losses import (
    GroupTargets,
    group_targets,
    level_losses,
    mix_loss,
    step_mix,
    step_weights,
    training_loss,
)
from .optim import Optimizers, clipped_params, lr_at, make_optimizer, pcgrad


class _StopFlag:
    """The first Ctrl-C or SIGTERM (``docker stop``, ``timeout``, a scheduler's pre-emption) asks
    the loop to save and stop at the end of the step; a second aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, *_: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *_: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class TrainResult:
    step: int
    stopped: str  # "done", "interrupted", "stop_after", "complete" (resumed at its last step)
    final: list[EvalRow] | None  # one row per sub-model (the full model first)
    main: bool = True  # this process speaks for the run (rank 0 under torchrun)


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


@dataclass
class Training:
    """What a training run holds between steps: built by :func:`setup`, advanced by
    :func:`train_step`, read back by :func:`flush`, scored by :func:`evaluate`."""

    cfg: RunConfig
    out: Path
    dd: Dist
    device: str
    tok: Tokenizer
    corpus: Corpus
    train_ids: Ids  # the training tokens this run reads: corpus.train, or its data_shard
    model: torch.nn.Module  # the model itself (sharded in place under parallel=fsdp)
    fwd: torch.nn.Module  # what the step calls: compiled and / or wrapped in DDP
    optimizer: torch.optim.Optimizer | Optimizers
    autocast: contextlib.AbstractContextManager
    val_batches: list
    start: int
    elapsed0: float
    progress: bool
    groups: GroupTargets  # soft token-group targets of the loss (groups / emergent_every), per level

    @property
    def sharded(self) -> bool:
        return self.cfg.train.parallel == "fsdp" and self.dd.world > 1


def setup(cfg: RunConfig, out: Path, resume: bool, progress: bool) -> Training:
    """Check everything, then build (or restore) data, model and optimizer; write the run folder.

    Order matters for sharding: weights are loaded into the whole model, then it is sharded,
    then the optimizer is made over the shards and its saved (whole) state split to match.
    """
    if not resume:
        cfg = absolute_data(cfg)
    t = cfg.train
    device = pick_device(t.device)
    dd = setup_distributed(device)
    if t.log == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise FractalError("log=tensorboard needs the tensorboard package: "
                           "pip install 'fractalformer[tensorboard]'")
    if dd.world > 1:
        dist.barrier()  # every rank has checked the folder before rank 0 writes to it
    if device == "cpu":
        set_cpu_threads(dd.local_world, t.threads)
        keep_freed_memory()
    if t.max_steps < t.warmup_steps and dd.main:
        warnings.warn(f"max_steps ({t.max_steps}) is below warmup_steps ({t.warmup_steps}): the learning "
                      f"rate never reaches lr", stacklevel=3)
    check_parallel(cfg, dd)

    saved = load_run_config(out) if resume else None
    tok, corpus = prepare_data(cfg, saved[1] if saved else init_tokenizer(cfg),
                               load_data_sha256(out) if resume else None)
    train_ids = shard_ids(corpus, cfg)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)  # every rank builds the same initial weights
    start, elapsed0, model_step = 0, 0.0, None
    if resume:
        model_step = ckpt.load_model_state(out, model)
    elif t.init_from:
        load_init(model, Path(t.init_from))
    if dd.rank:  # ... but draws its own dropout masks (rank 0 keeps the single-process stream)
        torch.manual_seed(t.seed + 1_000_003 * dd.rank)
    if t.parallel == "fsdp" and dd.world > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)  # one unit: every level's sub-models call the blocks several times a step
        # forward returns the full model's logits as a view; training never changes them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    optimizer = make_optimizer(model, cfg)
    if resume:
        layout = shard_like(optimizer) if dd.world > 1 else None
        info = ckpt.load_train_state(out, optimizer, dd.rank, layout)
        start, elapsed0 = info["step"], float(info.get("elapsed_s", 0.0))
        if model_step is not None and model_step != start:
            raise FractalError(f"{out}: model.safetensors (step {model_step}) and the training state "
                               f"(step {start}) are from different steps; the run was cut off mid-save")
        note = _resume_note(saved[0], cfg, start)
        if dd.main:
            if progress:
                print(note)
            start_metrics(out / "metrics.csv", metric_fields(cfg), keep_until=start)
            # a changed max_steps is the new horizon
            save_run_config(out, cfg, tok, corpus.sha256, corpus.val_units_per_token)
    elif dd.main:
        out.mkdir(parents=True, exist_ok=True)
        save_run_config(out, cfg, tok, corpus.sha256, corpus.val_units_per_token)
        start_metrics(out / "metrics.csv", metric_fields(cfg))

    precision = autocast(device, t.dtype)
    fwd = torch.compile(model) if t.compile else model
    if dd.world > 1 and t.parallel == "ddp":
        ids = [torch.cuda.current_device()] if device == "cuda" else None
        fwd = DDP(fwd, device_ids=ids)
    groups = {}
    if t.groups or t.emergent_every:
        widths = [model.level_width(lv) for lv in range(model.nest.levels)]
        groups = group_targets(model, hierarchy.initial_groups(out, tok, t.groups, widths,
                                                               start if resume else None, write=dd.main))
    val_batches = fixed_val_batches(corpus, t.eval_batches, t.batch_size, cfg.model.block_size, t.seed)
    if dd.main and progress:
        print(f"model: {model.num_params():,} parameters | data: {len(train_ids):,} train / "
              f"{len(corpus.val):,} val {tok.name} tokens | device: {device} x{dd.world}"
              f"{' (fsdp)' if t.parallel == 'fsdp' and dd.world > 1 else ''} | run folder: {out}")
    return Training(cfg, out, dd, device, tok, corpus, train_ids, model, fwd, optimizer, precision,
                    val_batches, start, elapsed0, progress, groups)


def shard_ids(corpus: Corpus, cfg: RunConfig) -> Ids:
    """The training tokens of ``data_shard`` [J, N]: contiguous shard J of N (all with [])."""
    t = cfg.train
    shard, shards = t.shard()
    size = len(corpus.train) // shards
    ids = corpus.train[shard * size:(shard + 1) * size]
    if len(ids) < cfg.model.block_size + 1:
        raise FractalError(f"data_shard {shard}/{shards} holds {len(ids)} tokens, fewer than block_size + 1")
    return ids


def save(s: Training, step: int, elapsed: float) -> None:
    """Checkpoint: whole tensors in the single-process format, whatever the number of
    processes, and every rank's generator (so a resumed run draws the masks it would have)."""
    state, opt = None, None
    if s.sharded:
        state = {k: whole(v) for k, v in s.model.state_dict().items()}
        sd = s.optimizer.state_dict()
        opt = {**sd, "state": {pid: {k: whole(v) for k, v in st.items()} for pid, st in sd["state"].items()}}
    rng = [torch.get_rng_state()]
    if s.dd.world > 1:
        mine = rng[0].to(s.device)
        rng = [torch.empty_like(mine) for _ in range(s.dd.world)]
        dist.all_gather(rng, mine)
    if s.dd.main:
        try:
            weights = state if state is not None else dict(s.model.state_dict())
            ckpt.save_checkpoint(s.out, weights, s.optimizer, {"step": step, "elapsed_s": elapsed},
                                 [r.cpu() for r in rng], opt)
        except FractalError as e:
            kept = f"; the previous checkpoint in {s.out} is kept" if ckpt.has_checkpoint(s.out) else ""
            raise FractalError(f"{e}{kept}") from None


@contextlib.contextmanager
def whole_model(s: Training) -> Any:
    """The model with whole parameters, for calls outside its forward (evaluation, sampling).

    A sharded model gathers its parameters (every rank takes part)."""
    if not s.sharded:
        yield s.model
        return
    s.model.unshard()
    try:
        yield s.model
    finally:
        s.model.reshard()


def set_lr(s: Training, step: int) -> float:
    lr = lr_at(step, s.cfg)
    for g in s.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr


def train_step(s: Training, step: int) -> torch.Tensor:
    """One optimizer step over this rank's share of the step's batch, in ``grad_accum``
    micro-batches. Returns ``[loss, *sub_losses]`` on the device, unread (no host sync)."""
    t, dd = s.cfg.train, s.dd
    x, y = training_batch(s.train_ids, t.batch_size, s.cfg.model.block_size,
                          batch_generator(t.seed, step), t.routing, s.model.nest.counts())
    levels, weights = step_weights(s.cfg, step)
    mix = step_mix(s.model, s.cfg, step)
    if weights is not None:
        weights = weights.to(s.device)
    local_b = t.batch_size // dd.world
    micro = local_b // t.grad_accum
    total = None
    for i in range(t.grad_accum):
        rows = slice(dd.rank * local_b + i * micro, dd.rank * local_b + (i + 1) * micro)
        last = i == t.grad_accum - 1
        if s.sharded:
            s.model.set_requires_gradient_sync(last)
        quiet = s.fwd.no_sync() if not last and isinstance(s.fwd, DDP) else contextlib.nullcontext()
        with quiet:
            with s.autocast:
                xb, yb = x[..., rows, :].to(s.device), y[..., rows, :].to(s.device)
                logits = s.fwd(xb) if levels is None else s.fwd(xb, levels)
                if t.level_grads == "pcgrad":
                    per_level, sub_losses = level_losses(s.model, logits, yb, s.groups, weights)
                    loss = torch.stack(list(per_level.values())).sum()
                else:
                    loss, sub_losses = training_loss(s.model, logits, yb, s.groups, weights)
                if mix is not None:  # the step's Mix'n'Match model takes its share of the objective
                    mixed = mix_loss(s.model.mix_forward(xb, mix), yb)
                    loss = (1 - t.mix_weight) * loss + t.mix_weight * mixed
            if t.level_grads == "pcgrad":
                surgery(s.model, list(per_level.values()), t.grad_accum, step)
            else:
                (loss / t.grad_accum).backward()
        part = torch.cat([loss.detach().float().view(1), sub_losses.float()]) / t.grad_accum
        total = part if total is None else total + part
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(clipped_params(s.model, s.cfg), t.grad_clip)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return total


def surgery(model: torch.nn.Module, per_level: list[torch.Tensor], accum: int, step: int) -> None:
    """``level_grads=pcgrad``: each level's gradient separately, combined by :func:`optim.pcgrad`
    and added to ``.grad`` (as a backward would). The levels' graphs share only the
    parameters, so the separate backward passes cost about what one would."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(loss / accum, params, retain_graph=i < len(per_level) - 1, allow_unused=True)
             for i, loss in enumerate(per_level)]
    combined = pcgrad([list(g) for g in grads], torch.Generator().manual_seed(step))
    for p, g in zip(params, combined, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad += g


def flush(s: Training, pending: list[tuple[int, float, float, torch.Tensor]], stop: bool
          ) -> tuple[list[dict[str, Any]], bool]:
    """Read the pending steps' losses back (averaged over processes, with the stop request):
    one metrics row each. A non-finite loss stops the run; no checkpoint was written since
    the last read, so the last one on disk is good."""
    stats = torch.stack([p[3] for p in pending])
    flag = torch.tensor([float(stop)], device=stats.device)
    if s.dd.world > 1:
        dist.all_reduce(stats)
        dist.all_reduce(flag)
        stats /= s.dd.world
    stats = stats.cpu()
    subs = s.cfg.model.sub_models()
    rows = []
    for (step, lr, elapsed, _), st in zip(pending, stats, strict=True):
        loss = float(st[0])
        if not math.isfinite(loss):
            raise FractalError(f"training loss became {loss} at step {step}; stopped. The last good "
                               f"checkpoint in {s.out} is kept (lower lr or grad_clip)")
        row: dict[str, Any] = {"step": step, "tokens": step * s.cfg.train.batch_size * s.cfg.model.block_size,
                               "lr": f"{lr:.6g}", "train_loss": f"{loss:.6f}", "elapsed_s": f"{elapsed:.2f}"}
        if len(subs) > 1:
            row |= {f"train_{sub_name(*k)}": f"{float(v):.6f}" if math.isfinite(v) else ""
                    for k, v in zip(subs, st[1:].tolist(), strict=True)}  # empty: its level did not run
        rows.append(row)
    return rows, bool(flag.item() > 0)


def evaluate(s: Training, row: dict[str, Any], bar: tqdm) -> None:
    """Validation losses on the fixed batches, added to the step's metrics row and printed."""
    with whole_model(s) as model:
        val, _ = mean_losses(model, s.val_batches, s.device, s.autocast)
    units, subs = s.corpus.val_units_per_token, s.cfg.model.sub_models()
    vl = val[(0, 0)]
    row |= {"val_loss": f"{vl:.6f}", "val_bpc": f"{to_bpc(vl, units):.4f}"}
    if len(subs) > 1:
        row |= {f"val_{sub_name(*k)}": f"{v:.6f}" for k, v in val.items()}
    if s.dd.main and s.progress:
        full = row[FULL_TRAIN] if len(subs) > 1 else row["train_loss"]  # like with like
        full = f"{float(full):.4f}" if full else "-"  # "-": the step's sample left the full model out
        bar.write(f"step {row['step']}: full model train {full} | val {vl:.4f} nats/token, "
                  f"{to_bpc(vl, units):.3f} bits/{s.tok.unit}")
        if len(subs) > 1:
            widths = [s.model.level_width(lv) for lv in range(s.model.nest.levels)]
            for line in level_table(val, widths):
                bar.write(line)


def train(cfg: RunConfig, out: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train (or resume) the run in ``out``; returns the final step and validation figures.

    The loop: set the lr, :func:`train_step`, and every ``sync_every`` steps (and at every
    evaluation, checkpoint, callback and the end) :func:`flush` the losses to the host,
    :func:`evaluate`, log, run the callbacks due and :func:`save`. Resuming a run already at
    ``max_steps`` does nothing (``stopped`` "complete"). The folder is held
    (:func:`claim_run_dir`) throughout.
    """
    out = Path(out)
    main = int(os.environ.get("RANK", "0")) == 0
    if resume:  # read alone, so that a finished run is left exactly as it is
        check_run_dir(out, resume)
        step = ckpt.read_train_info(out)["step"]
        if step == cfg.train.max_steps:
            return TrainResult(step, "complete", None, main)
    with claim_run_dir(out, resume, lock=main):
        return _train(cfg, out, resume, stop_after, progress)


def _train(cfg: RunConfig, out: Path, resume: bool, stop_after: int | None, progress: bool) -> TrainResult:
    s = setup(cfg, out, resume, progress)
    t, dd = s.cfg.train, s.dd
    bar = tqdm(total=t.max_steps, initial=s.start, disable=not (progress and dd.main),
               dynamic_ncols=True, unit="step")
    step, stopped, t0 = s.start, "done", time.perf_counter()
    last = t0
    log = (MetricsLog(s.out / "metrics.csv", metric_fields(s.cfg), tensorboard_writer(s.cfg, s.out, s.start))
           if dd.main else contextlib.nullcontext())
    pending: list[tuple[int, float, float, torch.Tensor]] = []
    scheduled = callbacks(s.cfg, s.tok, s.out, dd.main)
    with _StopFlag() as flag, log:
        s.model.train()
        while step < t.max_steps:
            lr = set_lr(s, step)
            stats = train_step(s, step)
            step += 1
            elapsed = s.elapsed0 + time.perf_counter() - t0
            pending.append((step, lr, elapsed, stats))
            evaluating = step % t.eval_every == 0 or step == t.max_steps
            saving = step % t.ckpt_every == 0 or step == t.max_steps
            due = [c for c in scheduled if c.due(step)]
            ending = stop_after is not None and step - s.start >= stop_after
            if not (step % t.sync_every == 0 or evaluating or saving or due or ending
                    or (dd.world == 1 and flag.requested)):  # ranks agree on a stop only at a sync
                continue
            rows, stop = flush(s, pending, flag.requested)
            if evaluating:
                evaluate(s, rows[-1], bar)
            if dd.main:
                for row in rows:
                    log.writerow(row)
            now = time.perf_counter()
            bar.set_postfix(loss=rows[-1]["train_loss"][:5], lr=f"{lr:.2e}",
                            tok_s=f"{len(rows) * t.batch_size * s.cfg.model.block_size / (now - last):,.0f}")
            last = now
            bar.update(len(rows))
            pending = []
            for callback in due:
                callback(s, step)
            if saving:
                save(s, step, elapsed)
            if stop:
                stopped = "interrupted"
                break
            if ending:
                stopped = "stop_after"
                break
    bar.close()
    if stopped != "done" or step % t.ckpt_every:
        save(s, step, s.elapsed0 + time.perf_counter() - t0)
    final = None
    if dd.main:
        plot_curves(s.out)
    if stopped == "done" and t.final_eval:
        with whole_model(s) as model:
            if dd.main:
                final = evaluate_full(model, s.corpus, s.cfg.model.block_size, s.device,
                                      windows_limit=closing_windows(t), progress=progress)
                if final[0].extra:
                    write_json(s.out / "expert_usage.json", final[0].extra)
    if dd.world > 1:
        dist.barrier()
    return TrainResult(step, stopped, final, dd.main)
