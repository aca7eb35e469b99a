"""FractalFormer: self-similar (nested) transformers in PyTorch."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig, RunConfig, TrainConfig
from .errors import FractalError
from .models import GPT, build_model
from .tokenizers import Tokenizer, get_tokenizer

__all__ = ["GPT", "FractalError", "ModelConfig", "RunConfig", "Tokenizer", "TrainConfig",
           "get_tokenizer", "load"]
__version__ = "0.1.0"


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The trained model of a run folder (any family), in eval mode.

    The returned model carries ``.config`` (its ModelConfig), ``.run_config`` (model and
    training config) and ``.tokenizer``.
    """
    from . import checkpoint as ckpt

    cfg, tok = ckpt.load_run_config(Path(run_dir))
    model = build_model(cfg.model)
    ckpt.load_model_state(Path(run_dir), model)
    model.run_config = cfg
    model.tokenizer = tok
    return model.to(device).eval()
