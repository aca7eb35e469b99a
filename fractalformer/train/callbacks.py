"""Work the loop does at chosen steps beside training, each as one callback.

A callback says at which steps it runs (:meth:`due`); the loop reads the losses back to the
host at those steps (every rank takes part) and then calls it with the training state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

from .. import hierarchy
from ..config import RunConfig, TrainConfig
from ..data.tokenizers import Tokenizer
from ..models import MoEGPT
from .losses import group_targets
from .optim import param_state

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


@dataclass
class Rekey:
    """Dead sub-keys: every ``rekey_every`` steps each product-key layer re-draws the sub-keys
    no selected expert used since the last time near used ones
    (``nn.product_keys.ProductKeys.rekey``), and their optimizer moments restart. Ranks sum
    their counts and draw from ``(seed, step)``, so every process re-draws the same keys."""

    cfg: RunConfig
    main: bool
    out: Path

    def due(self, step: int) -> bool:
        return step % self.cfg.model.moe.rekey_every == 0 and step < self.cfg.train.max_steps

    def __call__(self, training: Training, step: int) -> None:
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 15_485_863 + step)
        model: MoEGPT = training.model  # callbacks() schedules this for family moe only
        redrawn = {}
        for i, r in model.routers().items():
            keys = r.keys
            if dist.is_initialized():
                dist.all_reduce(keys.used)
            dead = keys.rekey(gen)
            for moment in param_state(training.optimizer, keys.sub_keys).values():
                if torch.is_tensor(moment) and moment.shape == keys.sub_keys.shape:
                    moment[dead] = 0
            redrawn[str(i)] = float(dead.double().mean())
        if self.main:
            with (self.out / "rekey.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "redrawn": redrawn}) + "\n")


def callbacks(cfg: RunConfig, tok: Tokenizer, out: Path, main: bool) -> list[Callback]:
    """The callbacks a run's config asks for."""
    out_list: list[Callback] = []
    if cfg.train.emergent_every:
        out_list.append(Recluster(cfg.train, tok, out, main))
    if cfg.model.family == "moe" and cfg.model.moe.rekey_every:
        out_list.append(Rekey(cfg, main, out))
    return out_list
