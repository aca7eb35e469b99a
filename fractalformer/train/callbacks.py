"""Work the loop does at chosen steps beside training, each as one callback.

A callback says at which steps it runs (:meth:`due`); the loop reads the losses back to the
host at those steps (every rank takes part) and then calls it with the training state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .. import hierarchy
from ..config import TrainConfig
from ..data.tokenizers import Tokenizer
from .losses import group_targets

if TYPE_CHECKING:
    from .trainer import Training


class Callback(Protocol):
    def due(self, step: int) -> bool: ...

    def __call__(self, training: Training, step: int) -> None: ...


@dataclass
class Recluster:
    """Emergent token groups: every ``emergent_every`` steps (the last step aside), cluster each
    level's token embeddings into groups and train on them as soft targets from then on
    (``fractalformer.hierarchy``); ``main`` (rank 0) logs each clustering to clusters.json."""

    train: TrainConfig
    tok: Tokenizer
    out: Path
    main: bool

    def due(self, step: int) -> bool:
        return step % self.train.emergent_every == 0 and step < self.train.max_steps

    def __call__(self, training: Training, step: int) -> None:
        t = self.train
        groups = hierarchy.recluster(training.model, t.cluster_method, t.cluster_eps, t.cluster_min_samples)
        training.groups = group_targets(training.model, groups)
        if self.main:
            hierarchy.log_clustering(self.out, step, groups, self.tok, t.cluster_method)


def callbacks(train: TrainConfig, tok: Tokenizer, out: Path, main: bool) -> list[Callback]:
    """The callbacks a run's config asks for."""
    return [Recluster(train, tok, out, main)] if train.emergent_every else []
