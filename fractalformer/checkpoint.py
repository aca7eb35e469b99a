"""Checkpoints: safetensors + JSON, written atomically, loaded without unpickling.

A run folder holds ``config.json`` (``fractalformer.runs``), its checkpoint, ``metrics.csv``
and plots. A checkpoint is three files, ``model.safetensors``,
``train_state.safetensors`` + ``train_state.json`` (optimizer, scheduler step, RNG),
written together into a new folder ``checkpoints/step-<step>-<tag>``, flushed to disk, and
only then made current by replacing ``checkpoint.json`` (which names that folder) in one
rename; older checkpoint folders are removed after it. A kill at any moment therefore
leaves the previous checkpoint current and whole. Run folders of earlier versions hold the
three files at their root and no ``checkpoint.json``; :func:`current` reads both layouts,
and every command finds its files through it. Every other file is written to a temporary
name in the same folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import FractalError
from .io import WriteError, atomic_write, current_umask, fsync_dir, read_json, write_error, write_json
from .nn.nesting import nested_parameters

CONFIG = "config.json"
MODEL = "model.safetensors"
STATE = "train_state.safetensors"
STATE_JSON = "train_state.json"
POINTER = "checkpoint.json"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"


def _tensor_prefix(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    return f"{name}|{dtype}|{shape}|".encode()


def _raw(t: torch.Tensor) -> Any:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(_tensor_prefix(name, t.dtype, tuple(t.shape)))
        h.update(_raw(t))
    return h.hexdigest()


def tensor_sha256(name: str, t: torch.Tensor) -> str:
    """SHA-256 of one tensor's name, dtype, shape and bytes: a lazy reader checks what it reads."""
    return hashlib.sha256(_tensor_prefix(name, t.dtype, tuple(t.shape)) + _raw(t).tobytes()).hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    """Safetensors with checksums in its metadata: of the whole contents (checked by
    ``load_tensors``) and of each tensor (checked by ``read_sub_model``, which reads a few)."""
    cpu, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        cpu[k] = t.clone() if ptr in seen else t  # a tied tensor is written under each of its names
        seen.add(ptr)
    per = {k: tensor_sha256(k, v) for k, v in cpu.items()}
    meta = {**(meta or {}), "sha256": tensors_sha256(cpu), "tensors_sha256": json.dumps(per, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=meta))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path``; a file whose contents fail their stored checksum is corrupt."""
    if not path.is_file():
        raise FractalError(f"{path} not found")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            want = (f.metadata() or {}).get("sha256")
    except (SafetensorError, OSError, ValueError) as e:
        raise FractalError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    if want is not None and tensors_sha256(tensors) != want:  # files from before checksums: no check
        raise FractalError(f"{path} is corrupt (its contents do not match the checksum saved with them)")
    return tensors


@dataclass(frozen=True)
class Checkpoint:
    """Where one checkpoint's three files lie: a folder under ``checkpoints/``, or the run
    folder itself in run folders written by earlier versions."""

    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / MODEL

    @property
    def state(self) -> Path:
        return self.folder / STATE

    @property
    def state_json(self) -> Path:
        return self.folder / STATE_JSON


def current(run_dir: str | Path) -> Checkpoint:
    """The run's current checkpoint: the folder ``checkpoint.json`` names, else (run folders
    of earlier versions) the run folder's root. Every reader of a run's weights or training
    state finds them here."""
    run_dir = Path(run_dir)
    pointer = run_dir / POINTER
    if not pointer.exists():
        return Checkpoint(run_dir)
    d = read_json(pointer)
    name = d.get("folder") if isinstance(d, dict) else None
    if not isinstance(name, str) or not name.startswith("step-") or Path(name).name != name:
        raise FractalError(f"{pointer} is damaged (it names no checkpoint folder)")
    folder = run_dir / CHECKPOINTS / name
    if not folder.is_dir():
        raise FractalError(f"{pointer} names {folder}, which is missing")
    return Checkpoint(folder)


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the run folder holds a checkpoint of either layout; one with only its config was
    cut off before its first checkpoint."""
    run_dir = Path(run_dir)
    return (run_dir / POINTER).exists() or (run_dir / MODEL).exists()


def save_checkpoint(run_dir: str | Path, model_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, info: dict[str, Any],
                    rng: list[torch.Tensor] | None = None, sd: dict[str, Any] | None = None) -> None:
    """Weights and training state at step ``info["step"]`` as one unit.

    The three files go into a new folder under ``checkpoints/``, flushed to disk; replacing
    ``checkpoint.json`` (one rename) then makes it current, so a failure or a kill at any
    point leaves the previous checkpoint current and whole (a failed write also removes the
    new folder). Older folders, half-written ones and an earlier version's root files go
    after the switch.

    ``model_state``: whole tensors (a sharded model's, gathered). ``rng``: the CPU generator
    state of every rank (default: this process's), stored as ``rng.torch.<rank>``. ``sd``:
    the optimizer state when not ``optimizer.state_dict()`` (a sharded run's, gathered
    whole): the files never depend on the number of processes.
    """
    run_dir = Path(run_dir)
    step = int(info["step"])
    root = run_dir / CHECKPOINTS
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"step-{step:08d}-", dir=root))
    except OSError as e:
        raise write_error(root, e) from None
    try:
        os.chmod(folder, 0o777 & ~current_umask())
        save_tensors(folder / MODEL, model_state, {"step": str(step)})
        _save_train_state(folder, optimizer, info, rng, sd)
        fsync_dir(root)
        write_json(run_dir / POINTER, {"step": step, "folder": folder.name})  # the switch: last
    except BaseException as e:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, (OSError, WriteError)):
            why = e.why if isinstance(e, WriteError) else write_error(folder, e).why
            raise WriteError(f"the checkpoint of step {step} in {run_dir}", why) from None
        raise
    for old in root.iterdir():
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    for name in (MODEL, STATE, STATE_JSON):
        with contextlib.suppress(OSError):
            (run_dir / name).unlink(missing_ok=True)


def lock_holder(run_dir: str | Path) -> str | None:
    """The PID of another process holding ``run_dir`` (:func:`run_lock`), else None; writes nothing."""
    run_dir = Path(run_dir)
    if Path(os.path.realpath(run_dir)) in _held:
        return None
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # closing drops a lock this probe took
    return None


def in_use(run_dir: str | Path, holder: str) -> FractalError:
    return FractalError(f"{run_dir} is in use by another fractalformer process (PID {holder}); "
                        "wait for it to end or choose another --out")


_held: dict[Path, int] = {}  # run folders this process has locked -> the lock file's descriptor


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir`` against every other writer (train, resume, merge, grow) until the block
    ends: an exclusive ``flock`` on ``RUN/.lock``, which records the holder's PID.

    Re-entrant within a process (merge and grow train the run they write). The kernel drops
    the lock when its process dies, so a killed run never leaves its folder locked.
    """
    run_dir = Path(run_dir)
    key = Path(os.path.realpath(run_dir))
    if key in _held:
        yield
        return
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise FractalError(f"cannot lock {run_dir} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise in_use(run_dir, holder) from None
        raise FractalError(f"cannot lock {run_dir} ({e.strerror})") from None
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)


def load_model_state(run_dir: Path, model: torch.nn.Module) -> int | None:
    """Load weights into ``model``, rejecting missing, extra or misshapen tensors.

    Returns the training step the weights were saved at (None if not recorded).
    """
    path = current(run_dir).model
    state = load_tensors(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise FractalError(f"{path} does not match config.json "
                           f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise FractalError(f"{path}: tensor {k} has shape {tuple(v.shape)}, config.json "
                               f"implies {tuple(own[k].shape)}")
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FractalError(f"{path}: tensor {k} holds non-finite values (nan or inf)")
    model.load_state_dict(state)
    try:
        with safe_open(str(path), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError):
        step = None
    return int(step) if step is not None and step.isdigit() else None


def read_sub_model(run_dir: Path, model: torch.nn.Module, level: int, index: int) -> dict[str, torch.Tensor]:
    """Sub-model ``(level, index)``'s weights, read from model.safetensors and nothing more.

    ``model`` only supplies the nesting of each parameter (build it on the meta device: it
    holds no memory). A sub-model owns a few contiguous runs of every nested dimension (one
    per head or fused part); the rows of each run are read with ``pread`` at the offsets
    of the safetensors header, and each tensor read is checked against its checksum (its
    whole bytes, streamed). safetensors' own lazy ``get_slice`` would read the same
    bytes through a memory map, whose touched pages (with the kernel's fault-around,
    about two thirds of the file for a level-2 sub-model) count in the process's peak RSS.
    """
    path = current(run_dir).model
    if not path.is_file():
        raise FractalError(f"{path} not found")
    state = {}
    with path.open("rb") as f:
        base, header = _header(f, path)
        verify = _verifier(f.fileno(), base, header, path)
        for key, p, dims in nested_parameters(model):
            meta = header.get(key)
            if not isinstance(meta, dict) or meta.get("shape") != list(p.shape) \
                    or meta.get("dtype") not in _DTYPES:
                raise FractalError(f"{path}: tensor {key} is missing or misshapen for config.json")
            verify(key)
            runs = [_runs(model.nest.owned(n, level, g)[index]) if g else [(0, n)]
                    for n, g in zip(p.shape, dims, strict=True)]
            dtype = _DTYPES[meta["dtype"]]
            row = math.prod(p.shape[1:]) * dtype.itemsize
            blocks = []
            for a, b in runs[0]:
                data = os.pread(f.fileno(), (b - a) * row, base + meta["data_offsets"][0] + a * row)
                if len(data) != (b - a) * row:
                    raise FractalError(f"{path} is truncated (tensor {key})")
                rows = torch.frombuffer(bytearray(data), dtype=dtype).view(b - a, *p.shape[1:])
                cols = [rows] if len(runs) == 1 else [rows[:, c:d] for c, d in runs[1]]
                blocks.append(torch.cat(cols, 1) if len(cols) > 1 else cols[0])
            state[key] = torch.cat(blocks)
    return state


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_ANY_DTYPE = {**_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_CHUNK = 1 << 20


def _verifier(fd: int, base: int, header: dict[str, Any], path: Path) -> Callable[[str], None]:
    """``verify(name)`` for a lazy reader: tensor ``name``'s bytes against its own checksum.

    Files from before per-tensor checksums are checked whole, once, against their file
    checksum; files from before checksums are not checked. Bytes are streamed in chunks,
    so checking costs reading time, not memory.
    """
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    if "tensors_sha256" in meta:
        try:
            sums = json.loads(meta["tensors_sha256"])
        except (TypeError, ValueError):
            sums = None
        if not isinstance(sums, dict):
            raise FractalError(f"{path} is corrupt (bad per-tensor checksums)")

        def verify(name: str) -> None:
            if _stream_sha256(fd, base, header, [name], path) != sums.get(name):
                raise FractalError(f"{path} is corrupt (tensor {name} does not match the checksum saved "
                                   f"with it)")

        return verify
    want = meta.get("sha256")
    names = sorted(k for k in header if k != "__metadata__")
    if want is not None and _stream_sha256(fd, base, header, names, path) != want:
        raise FractalError(f"{path} is corrupt (its contents do not match the checksum saved with them)")
    return lambda name: None


def _stream_sha256(fd: int, base: int, header: dict[str, Any], names: list[str], path: Path) -> str:
    """:func:`tensors_sha256` of tensors ``names`` of a safetensors file, from its bytes."""
    h = hashlib.sha256()
    for name in names:
        try:
            meta = header[name]
            dtype, shape = _ANY_DTYPE[meta["dtype"]], tuple(int(n) for n in meta["shape"])
            start, stop = (int(n) for n in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FractalError(f"{path} is corrupt (bad header entry for tensor {name})") from None
        h.update(_tensor_prefix(name, dtype, shape))
        for at in range(start, stop, _CHUNK):
            data = os.pread(fd, min(_CHUNK, stop - at), base + at)
            if len(data) != min(_CHUNK, stop - at):
                raise FractalError(f"{path} is truncated (tensor {name})")
            h.update(data)
    return h.hexdigest()


def _header(f: Any, path: Path) -> tuple[int, dict[str, Any]]:
    """The safetensors header (tensor name -> dtype, shape, data_offsets) and where data starts."""
    try:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, MemoryError, OverflowError):
        raise FractalError(f"{path} is corrupt or truncated (bad header)") from None
    if not isinstance(header, dict):
        raise FractalError(f"{path} is corrupt (bad header)")
    return 8 + n, header


def _runs(idx: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted indices as maximal contiguous ``(start, stop)`` runs."""
    v = idx.tolist()
    cuts = [0] + [i for i in range(1, len(v)) if v[i] != v[i - 1] + 1] + [len(v)]
    return [(v[a], v[b - 1] + 1) for a, b in itertools.pairwise(cuts)]


def _save_train_state(folder: Path, optimizer: torch.optim.Optimizer, info: dict[str, Any],
                      rng: list[torch.Tensor] | None, sd: dict[str, Any] | None) -> None:
    """Optimizer moments and generators as safetensors, everything scalar as JSON."""
    sd = sd if sd is not None else optimizer.state_dict()
    tensors = {f"rng.torch.{r}": s for r, s in enumerate(rng or [torch.get_rng_state()])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for pid, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"opt.{pid}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    save_tensors(folder / STATE, tensors)
    write_json(folder / STATE_JSON, {**info, "param_groups": sd["param_groups"]})


def read_train_info(run_dir: str | Path) -> dict[str, Any]:
    """The current checkpoint's ``train_state.json``, checked: a step (a whole number >= 0),
    the elapsed seconds and the optimizer's parameter groups."""
    path = current(run_dir).state_json
    info = read_json(path)
    if not isinstance(info, dict):
        raise FractalError(f"{path} is damaged (not a JSON object)")
    step, elapsed = info.get("step"), info.get("elapsed_s", 0.0)
    if step is None:
        raise FractalError(f"{path} is damaged (it has no step)")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise FractalError(f"{path} is damaged (step {step!r} is not a whole number >= 0)")
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed):
        raise FractalError(f"{path} is damaged (elapsed_s {elapsed!r} is not a number)")
    if not isinstance(info.get("param_groups"), list):
        raise FractalError(f"{path} is damaged (it has no optimizer param_groups)")
    return info


def load_train_state(run_dir: Path, optimizer: torch.optim.Optimizer, rank: int = 0,
                     layout: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Restore the optimizer and ``rank``'s generator; a rank the saving run did not have
    keeps the stream it was seeded with. ``layout(pid, tensor)`` places each saved (whole)
    state tensor as parameter ``pid`` is held (a shard of it, in a sharded run)."""
    info = read_train_info(run_dir)
    tensors = load_tensors(current(run_dir).state)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, val in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = layout(int(pid), val) if layout else val
    try:
        optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        rng = tensors.get(f"rng.torch.{rank}", tensors.get("rng.torch") if rank == 0 else None)
        if rng is not None:  # "rng.torch": run folders written before per-rank states
            torch.set_rng_state(rng)
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise FractalError(f"{run_dir}: training state does not match the model ({e})") from None
    return info
