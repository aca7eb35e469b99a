"""Building blocks shared by every model: norms, rotary embeddings, attention, MLP."""

from .attention import Attention, KVCache
from .mlp import GeGLU
from .norms import RMSNorm
from .rope import Rotary

__all__ = ["Attention", "GeGLU", "KVCache", "RMSNorm", "Rotary"]
