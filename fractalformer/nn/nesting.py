"""The nesting primitive: which slice of every weight dimension each sub-model owns.

Two schemes, one mechanism:

* ``block`` (FractalFormer): at level ``l`` there are ``split**l`` sub-models; sub-model
  ``j`` owns the contiguous block ``j`` of size ``D / split**l`` of a dimension, which lies
  inside block ``j // split`` of level ``l - 1``.
* ``prefix`` (Matryoshka / MatFormer): level ``l`` is one sub-model that owns the first
  ``D / split**l`` entries.

A dimension may consist of segments (for example the ``n_head`` heads of a query
projection, or the q, k and v parts of a fused projection); nesting then applies inside
every segment - the seed's "each head keeps its count, only head_dim shrinks". A
segment spec is an int ``g`` (``g`` equal segments) or a tuple of segment sizes.

Every layer asks the same question - "give me the sub-weights of all sub-models of level
``l``, stacked" - and gets a tensor with a leading sub-model axis, so one batched matmul
runs a whole level (block-diagonal in the full weight) with no Python loop over
sub-models. Level 0 owns everything and takes a fast path with no gather.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import FractalError

Segments = int | tuple[int, ...]  # n equal segments, or the segment sizes


@dataclass(frozen=True)
class Nesting:
    kind: str = "block"  # "block" or "prefix"
    levels: int = 1
    split: int = 2  # each level is 1/split the width of the one above

    def __post_init__(self) -> None:
        if self.kind not in ("block", "prefix"):
            raise FractalError(f"nesting kind must be 'block' or 'prefix', not {self.kind!r}")
        if self.levels < 1:
            raise FractalError(f"levels must be at least 1, got {self.levels}")
        if self.split < 2:
            raise FractalError(f"split must be at least 2, got {self.split}")

    # -- counting ------------------------------------------------------------------------
    def count(self, level: int) -> int:
        """Number of sub-models at ``level``."""
        self.check(level)
        return self.split**level if self.kind == "block" else 1

    def counts(self) -> list[int]:
        """Number of sub-models at every level, level 0 first."""
        return [self.count(lv) for lv in range(self.levels)]

    def check(self, level: int, index: int = 0) -> None:
        if not 0 <= level < self.levels:
            raise FractalError(f"level {level} is out of range: this model has levels 0..{self.levels - 1}")
        n = self.split**level if self.kind == "block" else 1
        if not 0 <= index < n:
            raise FractalError(f"index {index} is out of range: level {level} has sub-models 0..{n - 1}")

    def parent(self, level: int, index: int) -> tuple[int, int]:
        return (level - 1, index // self.split) if self.kind == "block" else (level - 1, 0)

    # -- ownership -----------------------------------------------------------------------
    def owned(self, full: int, level: int, groups: Segments = 1, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
        """Index tensor (count(level), size) of the entries each sub-model of ``level`` owns."""
        return _owned(self, full, level, groups, str(device))

    def take(self, t: torch.Tensor, level: int, dims: tuple[Segments, ...]) -> torch.Tensor:
        """Stack every level-``level`` sub-model's slice of ``t``: shape (count, *sliced).

        ``dims`` gives, per dimension of ``t``, its segments (0 = not nested, for example
        the vocabulary axis of the embedding).
        """
        if level == 0:
            return t.unsqueeze(0)
        return t[self.index(t.shape, level, dims, t.device)]

    def put(self, t: torch.Tensor, level: int, dims: tuple[Segments, ...], values: torch.Tensor) -> None:
        """The inverse of :meth:`take`: write ``values`` (count, *sliced) into the sub-models'
        slices of ``t``, in place. Merging and growing models assemble weights with it."""
        if level == 0:
            t.copy_(values[0])
        else:
            t[self.index(t.shape, level, dims, t.device)] = values.to(t.dtype)

    def index(self, shape: torch.Size, level: int, dims: tuple[Segments, ...],
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """Advanced index into a tensor of ``shape`` that gathers every sub-model's slice."""
        n = self.count(level)
        index = []
        for axis, groups in enumerate(dims):
            if groups:
                idx = self.owned(shape[axis], level, groups, device)
            else:
                idx = torch.arange(shape[axis], device=device).expand(n, -1)
            view = [n] + [1] * len(shape)
            view[axis + 1] = idx.shape[1]
            index.append(idx.reshape(view))
        return tuple(index)


def nested_parameters(module: torch.nn.Module
                      ) -> Iterator[tuple[str, torch.nn.Parameter, tuple[Segments, ...]]]:
    """(qualified name, parameter, segments per dimension) of every nested parameter under
    ``module``: those of the layers that declare ``nest_dims``. Extraction, merging, growth,
    lazy loading and parameter counts all slice weights by this one walk."""
    for mod_name, mod in module.named_modules():
        dims = getattr(mod, "nest_dims", None)
        if dims is None:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            yield f"{mod_name}.{pname}" if mod_name else pname, p, dims[pname]


@lru_cache(maxsize=256)
def _owned(nest: Nesting, full: int, level: int, groups: Segments, device: str) -> torch.Tensor:
    sizes = groups if isinstance(groups, tuple) else (full // groups,) * groups
    f = nest.split**level
    if sum(sizes) != full or any(s % f for s in sizes):
        raise FractalError(f"a dimension of {full} in segments {list(sizes)} does not nest {f} ways")
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    rows = []  # plain ints, one tensor at the end: torch.compile folds it to a constant
    for j in range(nest.count(level)):
        row: list[int] = []
        for start, size in zip(starts, sizes, strict=True):
            begin = start + (j * size // f if nest.kind == "block" else 0)
            row.extend(range(begin, begin + size // f))
        rows.append(row)
    return torch.tensor(rows, device=device)
