"""Loading a trained run folder: the whole model, or one sub-model from its slices alone."""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import RunConfig
from .errors import FractalError
from .memory import check_weights_file
from .models import GPT, build_model


def load(run_dir: str | Path, device: str | torch.device = "cpu", level: int | None = None,
         index: int | None = None) -> GPT:
    """The trained model of a run folder (any family), in eval mode.

    With ``level`` and ``index``, only sub-model ``(level, index)`` as a dense GPT: its
    slices alone are read from disk, so loading it takes about its own size in memory.
    The returned model carries ``.config`` (its ModelConfig), ``.run_config`` (model and
    training config) and ``.tokenizer``.
    """
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
