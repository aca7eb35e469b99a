"""FractalFormer: self-similar (nested) transformers in PyTorch.

The names backed by torch or numpy are imported on first use, so ``fractalformer --help``
and ``--version`` answer without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import ModelConfig, RunConfig, TrainConfig
from .errors import FractalError

if TYPE_CHECKING:
    from .data.tokenizers import Tokenizer, get_tokenizer
    from .loading import TrainedModel, load
    from .models import GPT, build_model

__all__ = ["GPT", "FractalError", "ModelConfig", "RunConfig", "Tokenizer", "TrainConfig", "TrainedModel",
           "build_model", "get_tokenizer", "load"]
__version__ = "0.1.0"

_LAZY = {"GPT": "models", "build_model": "models", "Tokenizer": "data.tokenizers",
         "get_tokenizer": "data.tokenizers", "load": "loading", "TrainedModel": "loading"}


def __getattr__(name: str) -> Any:
    """The names of ``_LAZY``, imported from their modules when first asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
