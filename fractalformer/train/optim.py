"""The optimizer of a run: AdamW groups, the lr schedule, frozen entries, and several
optimizers stepped, scheduled and checkpointed as one.

The MoE's sparse option trains its expert tables with ``SparseAdam`` (row-sparse
gradients) and everything else with ``AdamW``; the trainer and the checkpoint code see
one optimizer whose parameter ids run on from the first optimizer into the second, as
``torch.optim.Optimizer.state_dict`` numbers them within one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import RunConfig
from ..errors import FractalError
from ..nn.nesting import nested_parameters
from ..nn.product_keys import is_table


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


def param_state(optimizer: torch.optim.Optimizer | Optimizers | Frozen, p: torch.nn.Parameter
                ) -> dict[str, Any]:
    """The optimizer's state of ``p`` (its moments; empty before its first step), whichever
    of the trainer's optimizers holds it."""
    if isinstance(optimizer, Frozen):
        return param_state(optimizer.optimizer, p)
    if isinstance(optimizer, Optimizers):
        return next((o.state[p] for o in optimizer.optimizers if p in o.state), {})
    return optimizer.state.get(p, {})


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``; both start
    at ``schedule_start`` (0, or where a merged run's full training begins)."""
    t = cfg.train
    step, horizon = step - t.schedule_start, t.max_steps - t.schedule_start
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, horizon - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer | Optimizers:
    """AdamW; matrices (and the tied embedding) decay, norm scales and biases do not.

    Expert / memory tables (``fractalformer.nn.product_keys``) get a group of their own:
    peak lr ``table_lr`` (scaled along the same schedule), no weight decay; with
    ``moe_sparse`` their sparse gradients go to ``SparseAdam``, which updates only the rows
    a step selected. AdamW is fused (one kernel for every parameter) where torch allows. With
    ``freeze=children`` the optimizer keeps the children's entries fixed (``Frozen``): only
    the glue between them trains.
    """
    if cfg.train.freeze != "none":
        return Frozen(_make_optimizer(model, cfg), frozen_masks(model))
    return _make_optimizer(model, cfg)


def _make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer | Optimizers:
    t = cfg.train
    tables = [p for p in model.parameters() if is_table(p)]
    rest = [p for p in model.parameters() if not is_table(p)]
    groups: list[dict[str, Any]] = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    betas = (t.beta1, t.beta2)
    fused = _fused_adamw(next(model.parameters()).device)
    table_group = {"params": tables, "lr_scale": t.table_lr / t.lr if t.table_lr else 1.0}
    if not tables:
        return torch.optim.AdamW(groups, lr=t.lr, betas=betas, fused=fused)
    if cfg.model.moe.sparse:
        return Optimizers(torch.optim.AdamW(groups, lr=t.lr, betas=betas, fused=fused),
                          torch.optim.SparseAdam([table_group], lr=t.lr, betas=betas))
    return torch.optim.AdamW([*groups, {**table_group, "weight_decay": 0.0}], lr=t.lr, betas=betas,
                             fused=fused)


def _fused_adamw(device: torch.device) -> bool:
    """Whether AdamW may run as one fused kernel: on CUDA, and on CPU from torch 2.4 (4x
    faster than the per-tensor loop for the default model's step here)."""
    return device.type == "cuda" or (device.type == "cpu" and _TORCH >= (2, 4))


_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def clipped_params(model: torch.nn.Module, cfg: RunConfig) -> list[torch.nn.Parameter]:
    """Parameters under global gradient clipping: all but sparse-gradient tables."""
    return [p for p in model.parameters() if not (cfg.model.moe.sparse and is_table(p))]


def frozen_masks(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Per nested parameter, its frozen entries: those a level-1 sub-model (a child) owns.

    With ``glue_rank > 0`` the glue is the low-rank maps alone, so every entry of the
    nested weights is frozen (the off-diagonal blocks stay as they are until folded).
    """
    if model.nest.levels < 2:
        raise FractalError("freeze=children needs a nested model (levels >= 2)")
    nested = list(nested_parameters(model))
    glue = {id(p) for p in model.glue.parameters()} if getattr(model, "glue", None) is not None else set()
    if {id(p) for _, p, _ in nested} | glue != {id(p) for p in model.parameters()}:
        raise FractalError("freeze=children needs every parameter nested (no cross-level residual maps)")
    masks = []
    for _, p, dims in nested:
        mask = torch.full(p.shape, bool(glue), dtype=torch.bool, device=p.device)
        mask[model.nest.index(p.shape, 1, dims, p.device)] = True
        masks.append((p, mask))
    return masks


def pcgrad(grads: list[list[torch.Tensor | None]], gen: torch.Generator) -> list[torch.Tensor | None]:
    """Gradient surgery (PCGrad, Yu et al. 2020) over the levels' gradients of the same
    parameters: each level's gradient, where it conflicts with another's (negative dot
    product), loses its component along that one (the others in random order); the
    projected gradients are summed. Parameters no level reaches keep ``None``."""
    shapes = [next((g[i] for g in grads if g[i] is not None), None) for i in range(len(grads[0]))]
    flat = [torch.cat([(x if x is not None else torch.zeros_like(ref)).flatten()  # not reached: zeros
                       for x, ref in zip(g, shapes, strict=True) if ref is not None]) for g in grads]
    out = []
    for i, g in enumerate(flat):
        g = g.clone()
        others = [j for j in range(len(flat)) if j != i]
        for k in torch.randperm(len(others), generator=gen).tolist():
            h = flat[others[k]]
            dot = torch.dot(g, h)
            if dot < 0:
                g -= dot / h.dot(h).clamp_min(1e-30) * h
        out.append(g)
    total, result, at = torch.stack(out).sum(0), [], 0
    for ref in shapes:
        if ref is None:
            result.append(None)
            continue
        result.append(total[at:at + ref.numel()].view_as(ref))
        at += ref.numel()
    return result
