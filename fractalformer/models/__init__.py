"""Model families, one file each; ``build_model`` picks the class from the config."""

from __future__ import annotations

from ..config import ModelConfig
from .concept import ConceptGPT
from .fractal import FractalFormer
from .gpt import GPT
from .matryoshka import MRLGPT
from .moe import MoEGPT


def build_model(cfg: ModelConfig) -> GPT:
    """The model class of ``cfg.family``: gpt/matformer -> GPT, fractal, mrl, moe, concept."""
    families = {"fractal": FractalFormer, "mrl": MRLGPT, "moe": MoEGPT, "concept": ConceptGPT}
    return families.get(cfg.family, GPT)(cfg)


__all__ = ["GPT", "MRLGPT", "ConceptGPT", "FractalFormer", "MoEGPT", "build_model"]
