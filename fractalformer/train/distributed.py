"""Process groups under torchrun, and moving whole tensors to and from FSDP shards.

Checkpoints hold whole tensors whatever the number of processes, so a run resumes under
any number of them: a sharded run gathers its tensors to save and splits them to load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..errors import FractalError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def check_parallel(cfg: RunConfig, dd: Dist) -> None:
    t = cfg.train
    if t.batch_size % (dd.world * t.grad_accum):
        raise FractalError(f"batch_size {t.batch_size} is not divisible by {dd.world} processes x grad_accum "
                           f"{t.grad_accum}")
    if dd.world > 1 and cfg.model.moe.sparse:
        raise FractalError("moe_sparse is single-process for now: DistributedDataParallel cannot "
                           "all-reduce the tables' sparse gradients (use moe_sparse=false under torchrun)")
    if dd.world > 1 and t.routing != "shared":
        raise FractalError(f"routing={t.routing} is single-process for now: under DDP each rank would "
                           "re-split its share of the rows (use routing=shared)")
    if dd.world > 1 and t.mix_weight:
        raise FractalError("mix_weight is single-process for now: a Mix'n'Match forward bypasses DDP's "
                           "wrapper (use mix_weight=0 under torchrun)")
    if dd.world > 1 and t.level_grads != "sum":
        raise FractalError(f"level_grads={t.level_grads} is single-process for now: it combines the levels' "
                           "gradients before DDP's all-reduce could see them (use level_grads=sum)")
    if dd.world > 1 and t.parallel == "fsdp" and (t.groups or t.emergent_every):
        raise FractalError("parallel=fsdp does not support token groups (groups / emergent_every) yet: "
                           "use parallel=ddp")
    if dd.world > 1 and t.parallel == "fsdp" and t.freeze != "none":
        raise FractalError("parallel=fsdp does not support freeze=children yet (its masks cover whole "
                           "parameters): use parallel=ddp")


def shard_like(optimizer: torch.optim.Optimizer) -> Any:
    """``layout`` for load_train_state: a whole moment tensor becomes the shard its parameter holds."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]

    def layout(pid: int, value: torch.Tensor) -> torch.Tensor:
        p = params[pid] if pid < len(params) else None
        if isinstance(p, DTensor) and value.shape == p.shape:
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        return value

    return layout


def whole(value: Any) -> Any:
    """A sharded tensor gathered whole (a collective: every rank calls it); others as they are."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
