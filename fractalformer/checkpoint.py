"""Run folders: safetensors + JSON, written atomically, loaded without unpickling.

A run folder holds ``config.json`` (model, train and tokenizer sections),
``model.safetensors``, ``train_state.safetensors`` + ``train_state.json`` (optimizer,
scheduler step, RNG), ``metrics.csv`` and plots. Every file is written to a temporary
name in the same folder and renamed into place, so an interrupted write never leaves
a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
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


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
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


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=meta))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FractalError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FractalError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None


def save_run_config(run_dir: Path, cfg: RunConfig, tok: Tokenizer) -> None:
    tok.save(run_dir)  # before config.json, which names the tokenizer's files
    write_json(run_dir / CONFIG, {**cfg.to_dict(), "tokenizer": tok.to_dict()})


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


def save_model(run_dir: Path, model: torch.nn.Module, step: int) -> None:
    save_tensors(Path(run_dir) / MODEL, dict(model.state_dict()), {"step": str(step)})


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
    model.load_state_dict(state)
    try:
        with safe_open(str(path), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError):
        step = None
    return int(step) if step is not None and step.isdigit() else None


def save_train_state(run_dir: Path, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """Optimizer moments as safetensors, everything scalar as JSON (written last)."""
    sd = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for pid, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"opt.{pid}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    save_tensors(Path(run_dir) / STATE, tensors)
    write_json(Path(run_dir) / STATE_JSON, {**info, "param_groups": sd["param_groups"]})


def load_train_state(run_dir: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    info = read_json(Path(run_dir) / STATE_JSON)
    tensors = load_tensors(Path(run_dir) / STATE)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, val in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = val
    try:
        optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise FractalError(f"{run_dir}: training state does not match the model ({e})") from None
    return info
