"""The training loop: AdamW, warmup + cosine, clipping, periodic eval, checkpoints, DDP / FSDP.

Every step's batch is a pure function of ``(seed, step)``; under torchrun each rank takes
its contiguous share of that global batch, and with ``grad_accum`` each micro-batch its
contiguous share of that. Hence a resumed run sees exactly the data the uninterrupted run
would have, and N processes see exactly the single-process batch. Checkpoints hold whole
tensors whatever the number of processes (a sharded run gathers them), so a run resumes
under any number of processes.

Pieces, in the order a step uses them: :func:`setup` (checks, data, model, optimizer, run
folder), :func:`set_lr`, :func:`train_step` (micro-batches, backward, clipping, optimizer),
:func:`flush` (losses to the host every ``sync_every`` steps), :func:`evaluate`,
:func:`save`; :func:`train` is the loop that calls them.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import math
import os
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .. import checkpoint as ckpt
from .. import hierarchy
from ..config import RunConfig
from ..data import SHIPPED, Corpus, Ids, batch_generator, read_text, text_sha256, training_batch
from ..errors import FractalError
from ..evaluate import EvalRow, closing_windows, evaluate_full, fixed_val_batches, mean_losses, to_bpc
from ..models import build_model
from ..nn.product_keys import is_table
from ..prepare import is_prepared
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
    ens = [sub_name(lv, "ensemble") for lv in range(cfg.model.nesting.levels)
           if cfg.model.sub_model_count(lv) > 1]
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
    a step selected. AdamW is fused (one kernel for every parameter) where torch allows. With
    ``freeze=children`` the optimizer keeps the children's entries fixed (``Frozen``): only
    the glue between them trains.
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
    fused = _fused_adamw(next(model.parameters()).device)
    table_group = {"params": tables, "lr_scale": t.table_lr / t.lr if t.table_lr else 1.0}
    if not tables:
        return torch.optim.AdamW(groups, lr=t.lr, betas=betas, fused=fused)
    if cfg.model.moe.sparse:
        return Optimizers(torch.optim.AdamW(groups, lr=t.lr, betas=betas, fused=fused),
                          torch.optim.SparseAdam([table_group], lr=t.lr, betas=betas))
    return torch.optim.AdamW([*groups, {**table_group, "weight_decay": 0.0}], lr=t.lr, betas=betas,
                             fused=fused)


def _fused_adamw(device: torch.device) -> bool:
    """Whether AdamW may run as one fused kernel: on CUDA, and on CPU from torch 2.4 (4x
    faster than the per-tensor loop for the default model's step here)."""
    return device.type == "cuda" or (device.type == "cpu" and _TORCH >= (2, 4))


_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def clipped_params(model: torch.nn.Module, cfg: RunConfig) -> list[torch.nn.Parameter]:
    """Parameters under global gradient clipping: all but sparse-gradient tables."""
    return [p for p in model.parameters() if not (cfg.model.moe.sparse and is_table(p))]


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
    if name == "mps" and not torch.backends.mps.is_available():
        raise FractalError("device=mps was asked for but MPS (Apple's GPU backend) is not available")
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


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse a run folder that cannot be (re)used, before anything is written.

    A folder with a config but no checkpoint (a run cut off before its first one) holds
    nothing to resume, and a new run may take it over."""
    if out.is_symlink() and not out.exists():
        raise FractalError(f"{out} is a symbolic link to nothing (dangling, or a loop)")
    if out.exists() and not out.is_dir():
        raise FractalError(f"{out} is a file, not a run folder")
    if resume and not out.exists():
        raise FractalError(f"run folder not found: {out}")
    has_run = (out / ckpt.CONFIG).exists()
    if resume and not has_run:
        raise FractalError(f"{out} holds no run to resume")
    if resume and not ckpt.has_checkpoint(out):
        raise FractalError(f"{out} holds no checkpoint to resume: the run stopped before its first one "
                           f"(train again with --out {out} to start it over)")
    if not resume and has_run and ckpt.has_checkpoint(out):
        raise FractalError(f"{out} already holds a run; resume it or choose another run folder")
    existing = out
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise FractalError(f"cannot create run folder {out}: {existing} is a symbolic link to nothing")
    if not existing.is_dir():
        raise FractalError(f"cannot create run folder {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FractalError(f"cannot write run folder {out}: {existing} is not writable")


# what a run writes before its first checkpoint: cleared when a new run takes over such a folder
_UNFINISHED = ("metrics.csv", "curves.png", "clusters.json", "expert_usage.json", "tensorboard",
               ckpt.CHECKPOINTS)


@contextlib.contextmanager
def claim_run_dir(out: Path, resume: bool, lock: bool = True) -> Iterator[None]:
    """Hold run folder ``out`` for writing (train, resume, merge, grow, extract) until the block ends.

    Checked (a refusal names the process holding the folder, if one does), created and
    locked against a second writer (``lock``: this process is the one that writes, rank 0
    under torchrun), then checked again under the lock. A new run taking over a folder cut
    off before its first checkpoint clears what that one left, and a folder this call
    created is removed again if the block fails before a first checkpoint.
    """
    made = not out.exists()
    try:
        check_run_dir(out, resume)
    except FractalError:
        if lock and (holder := ckpt.lock_holder(out)):  # the run in use: name its holder instead
            raise ckpt.in_use(out, holder) from None
        raise
    if not lock:
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FractalError(f"cannot create run folder {out} ({e.strerror})") from None
    with ckpt.run_lock(out):
        try:
            check_run_dir(out, resume)
            if not resume and (out / ckpt.CONFIG).exists() and not ckpt.has_checkpoint(out):
                for name in _UNFINISHED:
                    path = out / name
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    elif path.exists() or path.is_symlink():
                        path.unlink()
            yield
        except BaseException:
            if made and not ckpt.has_checkpoint(out):
                shutil.rmtree(out, ignore_errors=True)
            raise


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


@dataclass
class Session:
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

    @property
    def sharded(self) -> bool:
        return self.cfg.train.parallel == "fsdp" and self.dd.world > 1


def _check_parallel(cfg: RunConfig, dd: Dist) -> None:
    t = cfg.train
    if t.batch_size % (dd.world * t.grad_accum):
        raise FractalError(f"batch_size {t.batch_size} is not divisible by {dd.world} processes x grad_accum "
                           f"{t.grad_accum}")
    if dd.world > 1 and cfg.model.moe.sparse:
        raise FractalError("moe_sparse is single-process for now: DistributedDataParallel cannot "
                           "all-reduce the tables' sparse gradients (use moe_sparse=false under torchrun)")
    if dd.world > 1 and t.routing != "shared":
        raise FractalError(f"routing={t.routing} is single-process for now: under DDP each rank would "
                           "re-split its share of the rows (use routing=shared)")
    if dd.world > 1 and t.parallel == "fsdp" and (t.groups or t.emergent_every):
        raise FractalError("parallel=fsdp does not support token groups (groups / emergent_every) yet: "
                           "use parallel=ddp")
    if dd.world > 1 and t.parallel == "fsdp" and t.freeze != "none":
        raise FractalError("parallel=fsdp does not support freeze=children yet (its masks cover whole "
                           "parameters): use parallel=ddp")


def setup(cfg: RunConfig, out: Path, resume: bool, progress: bool) -> Session:
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
    if t.max_steps < t.warmup_steps and dd.main:
        warnings.warn(f"max_steps ({t.max_steps}) is below warmup_steps ({t.warmup_steps}): the learning "
                      f"rate never reaches lr", stacklevel=3)
    _check_parallel(cfg, dd)

    saved = ckpt.load_run_config(out) if resume else None
    tok, corpus = prepare_data(cfg, saved[1] if saved else init_tokenizer(cfg),
                               ckpt.load_data_sha256(out) if resume else None)
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
        layout = _shard_like(optimizer) if dd.world > 1 else None
        info = ckpt.load_train_state(out, optimizer, dd.rank, layout)
        start, elapsed0 = info["step"], float(info.get("elapsed_s", 0.0))
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
    autocast = torch.autocast(device, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    fwd = torch.compile(model) if t.compile else model
    if dd.world > 1 and t.parallel == "ddp":
        ids = [torch.cuda.current_device()] if device == "cuda" else None
        fwd = DDP(fwd, device_ids=ids)
    if t.groups or t.emergent_every:
        widths = [model.level_width(lv) for lv in range(model.nest.levels)]
        model.set_groups(hierarchy.initial_groups(out, tok, t.groups, widths, start if resume else None,
                                                  write=dd.main))
    val_batches = fixed_val_batches(corpus, t.eval_batches, t.batch_size, cfg.model.block_size, t.seed)
    if dd.main and progress:
        print(f"model: {model.num_params():,} parameters | data: {len(train_ids):,} train / "
              f"{len(corpus.val):,} val {tok.name} tokens | device: {device} x{dd.world}"
              f"{' (fsdp)' if t.parallel == 'fsdp' and dd.world > 1 else ''} | run folder: {out}")
    return Session(cfg, out, dd, device, tok, corpus, train_ids, model, fwd, optimizer, autocast, val_batches,
                   start, elapsed0, progress)


def shard_ids(corpus: Corpus, cfg: RunConfig) -> Ids:
    """The training tokens of ``data_shard`` J/N: contiguous shard J of N (all with "")."""
    t = cfg.train
    shard, shards = t.shard()
    size = len(corpus.train) // shards
    ids = corpus.train[shard * size:(shard + 1) * size]
    if len(ids) < cfg.model.block_size + 1:
        raise FractalError(f"data_shard {shard}/{shards} holds {len(ids)} tokens, fewer than block_size + 1")
    return ids


def _shard_like(optimizer: torch.optim.Optimizer) -> Any:
    """``layout`` for load_train_state: a whole moment tensor becomes the shard its parameter holds."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]

    def layout(pid: int, value: torch.Tensor) -> torch.Tensor:
        p = params[pid] if pid < len(params) else None
        if isinstance(p, DTensor) and value.shape == p.shape:
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        return value

    return layout


def _whole(value: Any) -> Any:
    """A sharded tensor gathered whole (a collective: every rank calls it); others as they are."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def save(s: Session, step: int, elapsed: float) -> None:
    """Checkpoint: whole tensors in the single-process format, whatever the number of
    processes, and every rank's generator (so a resumed run draws the masks it would have)."""
    state, opt = None, None
    if s.sharded:
        state = {k: _whole(v) for k, v in s.model.state_dict().items()}
        sd = s.optimizer.state_dict()
        opt = {**sd, "state": {pid: {k: _whole(v) for k, v in st.items()} for pid, st in sd["state"].items()}}
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
def whole_model(s: Session) -> Any:
    """The model with whole parameters, for calls outside its forward (evaluation, sampling).

    A sharded model gathers its parameters (every rank takes part) and drops the slices
    the layers cached from the previous gathering."""
    if not s.sharded:
        yield s.model
        return
    s.model.unshard()
    for mod in s.model.modules():
        mod.__dict__.pop("_taken", None)
    try:
        yield s.model
    finally:
        for mod in s.model.modules():
            mod.__dict__.pop("_taken", None)
        s.model.reshard()


def set_lr(s: Session, step: int) -> float:
    lr = lr_at(step, s.cfg)
    for g in s.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr


def train_step(s: Session, step: int) -> torch.Tensor:
    """One optimizer step over this rank's share of the step's batch, in ``grad_accum``
    micro-batches. Returns ``[loss, *sub_losses]`` on the device, unread (no host sync)."""
    t, dd = s.cfg.train, s.dd
    x, y = training_batch(s.train_ids, t.batch_size, s.cfg.model.block_size,
                          batch_generator(t.seed, step), t.routing, s.model.nest)
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
                _, loss, sub_losses = s.fwd(x[..., rows, :].to(s.device), y[..., rows, :].to(s.device))
            (loss / t.grad_accum).backward()
        part = torch.cat([loss.detach().float().view(1), sub_losses.float()]) / t.grad_accum
        total = part if total is None else total + part
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(clipped_params(s.model, s.cfg), t.grad_clip)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return total


def flush(s: Session, pending: list[tuple[int, float, float, torch.Tensor]], stop: bool
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
            row |= {f"train_{sub_name(*k)}": f"{float(v):.6f}" for k, v in zip(subs, st[1:], strict=True)}
        rows.append(row)
    return rows, bool(flag.item() > 0)


def evaluate(s: Session, row: dict[str, Any], bar: tqdm) -> None:
    """Validation losses on the fixed batches, added to the step's metrics row and printed."""
    with whole_model(s) as model:
        val, _ = mean_losses(model, s.val_batches, s.device, s.autocast)
    units, subs = s.corpus.val_units_per_token, s.cfg.model.sub_models()
    vl = val[(0, 0)]
    row |= {"val_loss": f"{vl:.6f}", "val_bpc": f"{to_bpc(vl, units):.4f}"}
    if len(subs) > 1:
        row |= {f"val_{sub_name(*k)}": f"{v:.6f}" for k, v in val.items()}
    if s.dd.main and s.progress:
        full = float(row["train_0.0"]) if len(subs) > 1 else float(row["train_loss"])  # like with like
        bar.write(f"step {row['step']}: full model train {full:.4f} | val {vl:.4f} nats/token, "
                  f"{to_bpc(vl, units):.3f} bits/{s.tok.unit}")
        if len(subs) > 1:
            widths = [s.model.level_width(lv) for lv in range(s.model.nest.levels)]
            for line in _level_table(val, widths):
                bar.write(line)


def train(cfg: RunConfig, out: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train (or resume) the run in ``out``; returns the final step and validation figures.

    The loop: set the lr, :func:`train_step`, and every ``sync_every`` steps (and at every
    evaluation, checkpoint, re-clustering and the end) :func:`flush` the losses to the host,
    :func:`evaluate`, log and :func:`save`. Resuming a run already at ``max_steps`` does
    nothing (``stopped`` "complete"). The folder is held (:func:`claim_run_dir`) throughout.
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
    log = (_CsvLog(s.out / "metrics.csv", metric_fields(s.cfg), tensorboard_writer(s.cfg, s.out, s.start))
           if dd.main else contextlib.nullcontext())
    pending: list[tuple[int, float, float, torch.Tensor]] = []
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
            clustering = bool(t.emergent_every) and step % t.emergent_every == 0 and step < t.max_steps
            ending = stop_after is not None and step - s.start >= stop_after
            if not (step % t.sync_every == 0 or evaluating or saving or clustering or ending
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
            if clustering:
                groups = hierarchy.recluster(s.model, s.tok, t.cluster_method, t.cluster_eps,
                                             t.cluster_min_samples)
                s.model.set_groups(groups)
                if dd.main:
                    hierarchy.log_clustering(s.out, step, groups, s.tok, t.cluster_method)
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
        from ..analysis.plots import plot_curves

        plot_curves(s.out)
    if stopped == "done" and t.final_eval:
        with whole_model(s) as model:
            if dd.main:
                final = evaluate_full(model, s.corpus, s.cfg.model.block_size, s.device,
                                      windows_limit=closing_windows(t), progress=progress)
                if final[0].extra:
                    ckpt.write_json(s.out / "expert_usage.json", final[0].extra)
    if dd.world > 1:
        dist.barrier()
    return TrainResult(step, stopped, final, dd.main)


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
