"""Run folders: safetensors + JSON, written atomically, loaded without unpickling.

A run folder holds ``config.json`` (model, train and tokenizer sections),
``model.safetensors``, ``train_state.safetensors`` + ``train_state.json`` (optimizer,
scheduler step, RNG), ``metrics.csv`` and plots. Every file is written to a temporary
name in the same folder and renamed into place, so an interrupted write never leaves
a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import RunConfig
from .errors import FractalError
from .tokenizers import Tokenizer, tokenizer_from_dict

CONFIG = "config.json"
MODEL = "model.safetensors"
STATE = "train_state.safetensors"
STATE_JSON = "train_state.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file is created 0600; the result gets the mode a plain ``open`` would
    (0666 less the umask), so run folders can be shared like any other file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise FractalError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FractalError(f"{path} is not valid JSON ({e})") from None


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    """Safetensors with a checksum of the contents in its metadata (checked by ``load_tensors``)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {**(meta or {}), "sha256": tensors_sha256(cpu)}
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


def save_run_config(run_dir: Path, cfg: RunConfig, tok: Tokenizer, data_sha256: str | None = None) -> None:
    """``config.json``; ``data_sha256`` identifies the text the run trains on. The
    tokenizer's own files (a bpe:N ``tokenizer.json``) are written first: config.json names them."""
    tok.save(run_dir)
    extra = {"data_sha256": data_sha256} if data_sha256 else {}
    write_json(run_dir / CONFIG, {**cfg.to_dict(), "tokenizer": tok.to_dict(), **extra})


def load_data_sha256(run_dir: Path) -> str | None:
    """The SHA-256 of the run's training text (None for runs saved before it was recorded)."""
    value = read_json(Path(run_dir) / CONFIG).get("data_sha256")
    return value if isinstance(value, str) else None


def load_run_config(run_dir: Path) -> tuple[RunConfig, Tokenizer]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FractalError(f"run folder not found: {run_dir}")
    d = read_json(run_dir / CONFIG)
    cfg = RunConfig.from_dict(d)
    cfg.validate()
    tok = tokenizer_from_dict(d.get("tokenizer") or {"name": cfg.train.tokenizer}, run_dir)
    if tok.vocab_size != cfg.model.vocab_size:
        raise FractalError(f"{run_dir / CONFIG}: vocab_size {cfg.model.vocab_size} does not match "
                           f"the {tok.name} tokenizer's {tok.vocab_size}")
    return cfg, tok


def save_model(run_dir: Path, model: torch.nn.Module, step: int,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """``model``'s weights (or ``state``: a sharded model's, gathered whole) at ``step``."""
    save_tensors(Path(run_dir) / MODEL, state if state is not None else dict(model.state_dict()),
                 {"step": str(step)})


def load_model_state(run_dir: Path, model: torch.nn.Module) -> int | None:
    """Load weights into ``model``, rejecting missing, extra or misshapen tensors.

    Returns the training step the weights were saved at (None if not recorded).
    """
    path = Path(run_dir) / MODEL
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
    of the safetensors header. safetensors' own lazy ``get_slice`` would read the same
    bytes through a memory map, whose touched pages (with the kernel's fault-around,
    about two thirds of the file for a level-2 sub-model) count in the process's peak RSS.
    """
    path = Path(run_dir) / MODEL
    if not path.is_file():
        raise FractalError(f"{path} not found")
    state = {}
    with path.open("rb") as f:
        base, header = _header(f, path)
        for mod_name, mod in model.named_modules():
            dims = getattr(mod, "nest_dims", None)
            for pname, p in mod.named_parameters(recurse=False) if dims is not None else ():
                key = f"{mod_name}.{pname}"
                meta = header.get(key)
                if not isinstance(meta, dict) or meta.get("shape") != list(p.shape) \
                        or meta.get("dtype") not in _DTYPES:
                    raise FractalError(f"{path}: tensor {key} is missing or misshapen for config.json")
                runs = [_runs(model.nest.owned(n, level, g)[index]) if g else [(0, n)]
                        for n, g in zip(p.shape, dims[pname], strict=True)]
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


def save_train_state(run_dir: Path, optimizer: torch.optim.Optimizer, info: dict[str, Any],
                     rng: list[torch.Tensor] | None = None, sd: dict[str, Any] | None = None) -> None:
    """Optimizer moments as safetensors, everything scalar as JSON (written last).

    ``rng``: the CPU generator state of every rank (default: this process's), stored as
    ``rng.torch.<rank>``. ``sd`` is the optimizer state to save when not
    ``optimizer.state_dict()`` (a sharded run's, gathered whole: the files never depend on
    the number of processes).
    """
    sd = sd if sd is not None else optimizer.state_dict()
    tensors = {f"rng.torch.{r}": s for r, s in enumerate(rng or [torch.get_rng_state()])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for pid, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"opt.{pid}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    save_tensors(Path(run_dir) / STATE, tensors)
    write_json(Path(run_dir) / STATE_JSON, {**info, "param_groups": sd["param_groups"]})


def load_train_state(run_dir: Path, optimizer: torch.optim.Optimizer, rank: int = 0,
                     layout: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Restore the optimizer and ``rank``'s generator; a rank the saving run did not have
    keeps the stream it was seeded with. ``layout(pid, tensor)`` places each saved (whole)
    state tensor as parameter ``pid`` is held (a shard of it, in a sharded run)."""
    info = read_json(Path(run_dir) / STATE_JSON)
    tensors = load_tensors(Path(run_dir) / STATE)
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
    except (KeyError, ValueError, RuntimeError) as e:
        raise FractalError(f"{run_dir}: training state does not match the model ({e})") from None
    return info
