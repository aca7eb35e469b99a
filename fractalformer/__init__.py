"""FractalFormer: self-similar (nested) transformers in PyTorch.

The names backed by torch or numpy are imported on first use, so ``fractalformer --help``
and ``--version`` answer without loading torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ModelConfig, RunConfig, TrainConfig
from .errors import FractalError

if TYPE_CHECKING:
    import torch

    from .models import GPT, build_model
    from .tokenizers import Tokenizer, get_tokenizer

__all__ = ["GPT", "FractalError", "ModelConfig", "RunConfig", "Tokenizer", "TrainConfig",
           "build_model", "get_tokenizer", "load"]
__version__ = "0.1.0"

_LAZY = {"GPT": "models", "build_model": "models", "Tokenizer": "tokenizers", "get_tokenizer": "tokenizers"}


def __getattr__(name: str) -> Any:
    """``GPT``, ``build_model``, ``Tokenizer`` and ``get_tokenizer``, imported when first asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(run_dir: str | Path, device: str | torch.device = "cpu", level: int | None = None,
         index: int | None = None) -> GPT:
    """The trained model of a run folder (any family), in eval mode.

    With ``level`` and ``index``, only sub-model ``(level, index)`` as a dense GPT: its
    slices alone are read from disk, so loading it takes about its own size in memory.
    The returned model carries ``.config`` (its ModelConfig), ``.run_config`` (model and
    training config) and ``.tokenizer``.
    """
    import torch

    from . import checkpoint as ckpt
    from .memory import check_weights_file
    from .models import GPT, build_model

    cfg, tok = ckpt.load_run_config(Path(run_dir))
    if (level is None) != (index is None):
        raise FractalError("load a sub-model with both level and index")
    check_weights_file(ckpt.current(run_dir).model, cfg.model)
    if level == 0 and cfg.model.nesting.glue_rank:  # the full model's glue maps lie outside its slices
        model = build_model(cfg.model)
        ckpt.load_model_state(Path(run_dir), model)
        model = model.extract(level, index)
        cfg = RunConfig(model.config, cfg.train)
    elif level is not None:
        with torch.device("meta"):  # the nesting of every parameter, no memory
            full = build_model(cfg.model)
        full.nest.check(level, index)
        family = cfg.model.family
        if family in ("moe", "concept") or not full.extractable(level) or (family == "mrl" and level):
            raise FractalError(f"sub-model ({level}, {index}) is not a standalone model in family "
                               f"{cfg.model.family} (residual={cfg.model.nesting.residual})")
        model = GPT(full.sub_model_config(level))
        model.load_state_dict(ckpt.read_sub_model(Path(run_dir), full, level, index))
        cfg = RunConfig(model.config, cfg.train)
    else:
        model = build_model(cfg.model)
        ckpt.load_model_state(Path(run_dir), model)
    model.run_config = cfg
    model.tokenizer = tok
    return model.to(device).eval()
