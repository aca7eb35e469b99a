"""Training: the loop, its schedule and optimizer."""

from .optim import lr_at, make_optimizer
from .trainer import TrainResult, train

__all__ = ["TrainResult", "lr_at", "make_optimizer", "train"]
