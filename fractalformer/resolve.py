"""The config a new training run starts with: preset, TOML file, ``--set``, ``--init-from``, and
the tokenizer and vocabulary these imply.

Separate from config.py because it reads what lies above the config - the run fine-tuned
from, a prepared corpus' manifest, the training text a ``char`` or ``bpe:N`` tokenizer is
built from - to decide ``tokenizer`` and ``vocab_size`` when they are not given.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .config import RunConfig, apply_overrides, build_config, find_key, load_toml, parse_set
from .data.corpus import read_text
from .data.prepared import is_prepared, load_prepared
from .data.tokenizers import get_tokenizer
from .runs import load_run_config


def resolve_run_config(preset: str | None = None, toml_path: str | None = None, sets: list[str] | None = None,
                       *, data: str | None = None, tokenizer: str | None = None,
                       init_from: str | None = None) -> RunConfig:
    """``fractalformer train``'s config (validated): preset, TOML file, ``sets`` (``key=value``),
    then ``data``, ``tokenizer`` and ``init_from`` as the last of them.

    Unless named: fine-tuning takes the model config and tokenizer of the run ``init_from``
    names (model keys given still apply); prepared data its own tokenizer; and
    ``vocab_size`` is the tokenizer's.
    """
    sets = list(sets or [])
    for name, value in (("data", data), ("tokenizer", tokenizer), ("init_from", init_from)):
        if value:
            sets.append(f"{name}={value}")
    cfg = build_config(preset, toml_path, sets)
    given = (load_toml(toml_path) if toml_path else {}) | parse_set(sets)
    given.pop("preset", None)
    named = {find_key(k).dotted for k in given}
    if cfg.train.init_from:
        init_cfg, init_tok = load_run_config(Path(cfg.train.init_from))
        cfg = fine_tune_config(cfg, init_cfg, given)
        if "tokenizer" not in named:
            cfg.train.tokenizer = init_tok.name
        return cfg
    if is_prepared(cfg.train.data):  # prepared data: its tokenizer unless one is named
        tok = load_prepared(cfg.train.data)[1]
        if "tokenizer" not in named:
            cfg.train.tokenizer = tok.name
    else:
        tok = get_tokenizer(cfg.train.tokenizer, read_text(cfg.train.data))
    if "vocab_size" not in named:
        cfg.model.vocab_size = tok.vocab_size
    return cfg


def fine_tune_config(cfg: RunConfig, init: RunConfig, given: dict[str, Any]) -> RunConfig:
    """Fine-tuning: the model config of the run started from, under ``cfg``'s training config;
    model keys set explicitly (``given``) still apply (a changed shape fails at loading)."""
    out = RunConfig(copy.deepcopy(init.model), cfg.train)
    apply_overrides(out, {k: v for k, v in given.items() if find_key(k).part == "model"})
    out.validate()
    return out
