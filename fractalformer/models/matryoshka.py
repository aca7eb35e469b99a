"""Matryoshka family on the nesting primitive.

* **MRL head** (:class:`MRLGPT`, ``family = "mrl"``; seed matryoshka_embeddings_gpt): a
  dense body; only the final normed state and the tied output are prefix-sliced, one
  loss per size: ``logits_l = x[..., :d_l] @ E[:, :d_l]^T`` with ``d_l = d / split**l``.
* **MatFormer+** (``family = "matformer"``): every part prefix-nested. That is plain
  :class:`~fractalformer.models.gpt.GPT` with prefix nesting, so it needs no class here.
"""

from __future__ import annotations

import torch

from .gpt import GPT


class MRLGPT(GPT):
    def body_levels(self) -> list[int]:
        return [0]

    def extractable(self, level: int) -> bool:
        return level == 0  # a prefix of the output alone is not a smaller GPT

    def needed_levels(self, level: int) -> list[int]:
        return [0]

    def num_params(self, level: int = 0) -> int:
        """An MRL size reads the whole body, the full tied embedding included (it embeds the
        input), and only its prefix of the final norm's scale: every parameter but the
        ``d - d_l`` scale entries past its width."""
        return super().num_params() - (self.config.d_model - self.level_width(level))

    def head(self, states: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        x = self.norm(states[0], 0)  # normalised once, over the full width
        d = x.shape[-1]
        return {lv: self.embed.logits(x[..., : d // self.nest.split**lv], lv)
                for lv in range(self.nest.levels)}
