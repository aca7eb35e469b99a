"""Training: the loop, its schedule and optimizer."""

from .trainer import TrainResult, lr_at, make_optimizer, train

__all__ = ["TrainResult", "lr_at", "make_optimizer", "train"]
