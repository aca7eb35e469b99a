"""Training: the loop (``trainer``), the losses (``losses``), its optimizer and schedule
(``optim``), process groups (``distributed``), the metrics log and its curves (``logs``,
``curves``) and the callbacks it runs (``callbacks``).

``train``, ``TrainResult``, ``lr_at`` and ``make_optimizer`` are imported from their modules
when first asked for, so importing one module of this package does not import the loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .optim import lr_at, make_optimizer
    from .trainer import TrainResult, train

__all__ = ["TrainResult", "lr_at", "make_optimizer", "train"]

_LAZY = {"TrainResult": "trainer", "train": "trainer", "lr_at": "optim", "make_optimizer": "optim"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
