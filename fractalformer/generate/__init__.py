"""Text generation: sampling with temperature / top-k / top-p and a KV cache."""

from .sampling import generate, sample_next

__all__ = ["generate", "sample_next"]
