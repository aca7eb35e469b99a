"""Loading a trained run folder: the whole model, or one sub-model from its slices alone,
with the tokenizer and config it was trained with and a text API on top."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import ModelConfig, RunConfig
from .data.tokenizers import Tokenizer
from .errors import FractalError
from .generate.sampling import stream_text
from .memory import check_weights_file
from .models import GPT, build_model
from .models.fractal import Mix
from .runs import load_run_config


@dataclass
class TrainedModel:
    """What :func:`load` returns: the model (a plain ``nn.Module``, in eval mode) with the
    tokenizer and the run config it was trained with, and text in, text out on top."""

    model: GPT
    tokenizer: Tokenizer
    run_config: RunConfig
    mix: Mix | None = None  # the Mix'n'Match model loaded (its levels per layer), if one was
    mix_params: int | None = None  # the parameters that mix uses (the model holds zeros besides)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def stream(self, prompt: str, max_new_tokens: int = 200, **kwargs: Any) -> Iterator[str]:
        """Text pieces continuing ``prompt``; keyword arguments and defaults as :meth:`generate`."""
        return stream_text(self.model, self.tokenizer, prompt, max_new_tokens, **kwargs)

    def generate(self, prompt: str, max_new_tokens: int = 200, **kwargs: Any) -> str:
        """The text continuing ``prompt`` (without it), with the ``sample`` command's defaults.

        Keywords: ``temperature`` (0.8; 0 = greedy), ``top_k``, ``top_p``, ``seed``, ``level``
        and ``index`` (the sub-model; ``index="ensemble"`` for a whole level), ``on_unknown``
        (``"error"`` or ``"replace"``), ``use_cache`` and ``compile`` (torch.compile the decode step).
        """
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))

    @torch.no_grad()
    def sub_model_logits(self, idx: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        """Logits (B, T, vocab) of every sub-model on token ids ``idx`` (B, T), keyed (level, index)."""
        return {(lv, j): lg[j] for lv, lg in self.model(idx).items() for j in range(lg.shape[0])}


def load(run_dir: str | Path, device: str | torch.device = "cpu", level: int | None = None,
         index: int | None = None, mix: str | Sequence[int | tuple[int, int]] | None = None) -> TrainedModel:
    """The trained model of a run folder (any family), in eval mode, with its tokenizer and config.

    With ``level`` and ``index``, only sub-model ``(level, index)`` as a dense GPT: its
    slices alone are read from disk, so loading it takes about its own size in memory.
    With ``mix`` (a FractalFormer: ``"0,1,1,2"``, a level per layer, or ``A:M`` for attention
    and MLP), the Mix'n'Match model: a dense GPT of the full shape whose parts keep only
    their level's block diagonal (``FractalFormer.extract_mix``).
    """
    cfg, tok = load_run_config(Path(run_dir))
    if (level is None) != (index is None):
        raise FractalError("load a sub-model with both level and index")
    if mix is not None and level is not None:
        raise FractalError("load either a sub-model (level, index) or a mix, not both")
    check_weights_file(ckpt.current(run_dir).model, cfg.model)
    if mix is not None:
        if cfg.model.family != "fractal":
            raise FractalError(f"--mix needs a FractalFormer run (family fractal), not family "
                               f"{cfg.model.family}")
        full = build_model(cfg.model)
        ckpt.load_model_state(Path(run_dir), full)
        parsed = full.parse_mix(mix)
        model = full.extract_mix(parsed)
        return TrainedModel(model.to(device).eval(), tok, RunConfig(model.config, cfg.train), parsed,
                            full.mix_params(parsed))
    elif level == 0 and cfg.model.nesting.glue_rank:  # the full model's glue maps lie outside its slices
        model = build_model(cfg.model)
        ckpt.load_model_state(Path(run_dir), model)
        model = model.extract(level, index)
        cfg = RunConfig(model.config, cfg.train)
    elif level is not None:
        with torch.device("meta"):  # the nesting of every parameter, no memory
            full = build_model(cfg.model)
        full.nest.check(level, index)
        if not full.extractable(level):
            raise FractalError(f"sub-model ({level}, {index}) is not a standalone model in family "
                               f"{cfg.model.family} (residual={cfg.model.nesting.residual})")
        model = GPT(full.sub_model_config(level))
        model.load_state_dict(ckpt.read_sub_model(Path(run_dir), full, level, index))
        cfg = RunConfig(model.config, cfg.train)
    else:
        model = build_model(cfg.model)
        ckpt.load_model_state(Path(run_dir), model)
    return TrainedModel(model.to(device).eval(), tok, cfg)
