"""Building blocks shared by every model, all written once on the nesting primitive."""

from .attention import Attention, KVCache
from .linear import Embedding, Linear
from .mlp import GeGLU
from .nesting import Nesting
from .norms import RMSNorm
from .rope import Rotary

__all__ = ["Attention", "Embedding", "GeGLU", "KVCache", "Linear", "Nesting", "RMSNorm", "Rotary"]
