"""Run folders: their config.json (model, training and tokenizer config, and what training
measured of its text), checked and held for writing, their data found again, their config
and tokenizer carried into fine-tuning. The checkpoint inside is ``checkpoint.py``'s.

Every command that writes a run folder (train, resume, merge, grow, extract) holds it
through :func:`claim_run_dir`; every command that scores a trained run reads its data
through :func:`run_data`, which notices a text changed since training.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import RunConfig
from .data.corpus import SHIPPED, Corpus, read_text, text_sha256
from .data.prepared import is_prepared
from .data.tokenizers import Tokenizer, get_tokenizer, tokenizer_from_dict
from .errors import FractalError
from .io import read_json, write_json


def save_run_config(run_dir: Path, cfg: RunConfig, tok: Tokenizer, data_sha256: str | None = None,
                    val_units_per_token: float | None = None) -> None:
    """``config.json``; ``data_sha256`` identifies the text the run trains on and
    ``val_units_per_token`` (characters or bytes per token of its validation split) turns
    its losses into bits per character without tokenising the text again. The tokenizer's
    own files (a bpe:N ``tokenizer.json``) are written first: config.json names them."""
    tok.save(run_dir)
    extra: dict[str, Any] = {"data_sha256": data_sha256} if data_sha256 else {}
    if val_units_per_token is not None:
        extra["val_units_per_token"] = val_units_per_token
    write_json(run_dir / ckpt.CONFIG, {**cfg.to_dict(), "tokenizer": tok.to_dict(), **extra})


def load_data_sha256(run_dir: Path) -> str | None:
    """The SHA-256 of the run's training text (None for runs saved before it was recorded)."""
    value = read_json(Path(run_dir) / ckpt.CONFIG).get("data_sha256")
    return value if isinstance(value, str) else None


def load_val_units_per_token(run_dir: Path) -> float | None:
    """Characters (bytes) per token of the run's validation split, as training measured it
    (None for runs saved before it was recorded)."""
    value = read_json(Path(run_dir) / ckpt.CONFIG).get("val_units_per_token")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def load_run_config(run_dir: Path) -> tuple[RunConfig, Tokenizer]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FractalError(f"run folder not found: {run_dir}")
    d = read_json(run_dir / ckpt.CONFIG)
    cfg = RunConfig.from_dict(d)
    cfg.validate()
    tok = tokenizer_from_dict(d.get("tokenizer") or {"name": cfg.train.tokenizer}, run_dir)
    if tok.vocab_size != cfg.model.vocab_size:
        raise FractalError(f"{run_dir / ckpt.CONFIG}: vocab_size {cfg.model.vocab_size} does not match "
                           f"the {tok.name} tokenizer's {tok.vocab_size}")
    return cfg, tok


# -- checkpoints ---------------------------------------------------------------------------------


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
    _, tok = load_run_config(Path(cfg.train.init_from))
    if cfg.train.tokenizer != tok.name:
        return None
    return tok


def load_init(model: torch.nn.Module, run: Path) -> None:
    """Fine-tuning: the weights of ``run``, or one clear line on why they do not fit."""
    try:
        ckpt.load_model_state(run, model)
    except FractalError as e:
        raise FractalError(f"--init-from {run}: its weights do not fit this model ({e})") from None


def run_data(run_dir: str | Path, cfg: RunConfig, tok: Tokenizer, data: str | None = None) -> Corpus:
    """The corpus a trained run (config ``cfg``, tokenizer ``tok``) is scored on: its own
    text, checked unchanged, or ``data``."""
    if data is not None:
        return prepare_data(replace(cfg, train=replace(cfg.train, data=data)), tok)[1]
    path = cfg.train.data
    if path not in (None, SHIPPED) and not Path(path).is_file() and not is_prepared(path):
        raise FractalError(f"the run's data file {path} is not found here; name the data file explicitly")
    return prepare_data(cfg, tok, load_data_sha256(Path(run_dir)))[1]


def absolute_data(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its data file as an absolute path, so the run folder works from anywhere."""
    if cfg.train.data in (None, SHIPPED):
        return cfg
    return replace(cfg, train=replace(cfg.train, data=str(Path(cfg.train.data).resolve())))


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse a run folder that cannot be (re)used, before anything is written; a refusal
    names the process holding the folder, if one does.

    A folder with a config but no checkpoint (a run cut off before its first one) holds
    nothing to resume, and a new run may take it over."""
    try:
        _check_run_dir(out, resume)
    except FractalError:
        if holder := ckpt.lock_holder(out):  # the run in use: name its holder instead
            raise ckpt.in_use(out, holder) from None
        raise


def _check_run_dir(out: Path, resume: bool) -> None:
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
    (check_run_dir if lock else _check_run_dir)(out, resume)
    if not lock:
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FractalError(f"cannot create run folder {out} ({e.strerror})") from None
    with ckpt.run_lock(out):
        try:
            _check_run_dir(out, resume)
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
