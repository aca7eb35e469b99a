"""Text generation: sampling (temperature / top-k / top-p, KV cache) and speculative decoding."""

from .sampling import generate, probabilities, sample_next
from .spec_policy import SpecStats
from .speculative import speculate

__all__ = ["SpecStats", "generate", "probabilities", "sample_next", "speculate"]
