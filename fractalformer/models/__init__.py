"""Model families. Each file holds one family; ``build_model`` picks by config."""

from .gpt import GPT

__all__ = ["GPT"]
