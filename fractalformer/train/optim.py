"""Several optimizers stepped, scheduled and checkpointed as one.

The MoE's sparse option trains its expert tables with ``SparseAdam`` (row-sparse
gradients) and everything else with ``AdamW``; the trainer and the checkpoint code see
one optimizer whose parameter ids run on from the first optimizer into the second, as
``torch.optim.Optimizer.state_dict`` numbers them within one.
"""

from __future__ import annotations

from typing import Any

import torch


class Optimizers:
    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for o in self.optimizers:
            sd = o.state_dict()
            state |= {pid + offset: st for pid, st in sd["state"].items()}
            groups += [{**g, "params": [p + offset for p in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        groups = list(sd["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the saved state has {len(groups)} parameter groups, the optimizer "
                             f"{len(self.param_groups)}")
        offset = 0
        for o in self.optimizers:
            mine, groups = groups[: len(o.param_groups)], groups[len(o.param_groups):]
            n = sum(len(g["params"]) for g in mine)
            o.load_state_dict({
                "state": {int(pid) - offset: _plain_step(o, st) for pid, st in sd["state"].items()
                          if offset <= int(pid) < offset + n},
                "param_groups": [{**g, "params": [p - offset for p in g["params"]]} for g in mine],
            })
            offset += n


def _plain_step(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """SparseAdam counts steps in a Python int (its bias correction is computed in float64);
    a checkpoint stores it as a tensor, which would round the correction differently."""
    if isinstance(optimizer, torch.optim.SparseAdam) and torch.is_tensor(state.get("step")):
        return {**state, "step": int(state["step"])}
    return state


class Frozen:
    """An optimizer under which the masked entries of some parameters never change.

    Gradients are masked as they are computed (so clipping and Adam's moments see only
    the trainable entries), and after every step the frozen entries are written back:
    AdamW's decoupled weight decay shrinks a parameter whatever its gradient, so masking
    gradients alone would not keep them bit-identical.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | Optimizers,
                 masks: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        self.optimizer = optimizer
        self.masks = masks  # (parameter, bool mask of its frozen entries)
        for p, frozen in masks:
            keep = (~frozen).to(p.dtype)
            p.register_hook(lambda g, keep=keep: g * keep)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def step(self) -> None:
        saved = [p.detach()[frozen] for p, frozen in self.masks]
        self.optimizer.step()
        with torch.no_grad():
            for (p, frozen), v in zip(self.masks, saved, strict=True):
                p[frozen] = v

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(sd)
