"""Model families, one file each; ``build_model`` picks the class from the config."""

from __future__ import annotations

from ..config import ModelConfig
from .fractal import FractalFormer
from .gpt import GPT
from .matryoshka import MRLGPT
from .moe import MoEGPT


def build_model(cfg: ModelConfig) -> GPT:
    """The model class of ``cfg.family``: gpt/matformer -> GPT, fractal, mrl, moe."""
    return {"fractal": FractalFormer, "mrl": MRLGPT, "moe": MoEGPT}.get(cfg.family, GPT)(cfg)


__all__ = ["GPT", "MRLGPT", "FractalFormer", "MoEGPT", "build_model"]
