"""Model fusion and growth: build a FractalFormer out of trained models.

* **merge** (the seed's ModelMerging idea): ``split`` trained runs of one shape become the
  level-1 sub-models - the diagonal blocks of every weight - of a new FractalFormer of
  ``split`` times the width. The off-diagonal blocks (the *glue*) start at zero and are
  what trains first (``freeze=children`` keeps the children's entries bit-identical,
  through AdamW's weight decay too); then, optionally, everything trains. Children may be
  FractalFormers themselves, so merging repeats: four quarter-width runs -> two halves ->
  one full model.
* **grow** of a ``family=concept`` run (:func:`grow_concept_run`) adds a concept level on
  top instead (``models/concept.grow``: a no-op until the read scale trains).
* **grow** (Net2Net-style, function-preserving): a run becomes sub-model (1, 0) of a
  FractalFormer ``width`` times as wide. Every other level-1 block is a copy of it, so
  the residual stream holds ``width`` equal copies and every RMSNorm, attention head and
  MLP of the full model computes what the original did; the copies' final-norm scale is
  ``1 + w = 0``, so only block 0 reaches the tied output. ``depth`` inserts identity
  layers (attention and MLP output projections zero) after every layer. The grown model's
  loss equals the original's at the growth step (up to float rounding).

Every run made from runs (merge, grow, and ``extract`` of one sub-model) is written by
:func:`write_new_run`: an ordinary run folder at step 0 that ``train --resume`` trains on.

Both work on the :class:`~fractalformer.nn.Nesting` primitive: ``put`` writes the
children's weights into their blocks, exactly where ``take`` (and so ``extract``) reads
them back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import ModelConfig, RunConfig, TrainConfig, apply_overrides, find_key, parse_set
from .data.tokenizers import Tokenizer
from .errors import FractalError
from .evaluate import fixed_val_batches, mean_losses, to_bpc
from .io import write_json
from .loading import load
from .memory import check_training_fits
from .models import GPT, FractalFormer
from .models.concept import ConceptGPT, grow
from .models.fractal import fold_glue
from .nn.nesting import nested_parameters
from .runs import check_run_dir, claim_run_dir, load_data_sha256, prepare_data, save_run_config
from .train.optim import make_optimizer
from .train.trainer import train


def _check_parent_shape(parent: GPT, child: ModelConfig) -> None:
    """The level-1 sub-models of ``parent`` must have exactly the child's shape."""
    sub = parent.sub_model_config(1)
    for name in ("d_model", "n_head", "n_kv_head", "head_dim", "mlp_hidden", "n_layer", "vocab_size"):
        if getattr(sub, name) != getattr(child, name):
            raise FractalError(f"a sub-model of the merged model would have {name} {getattr(sub, name)}, "
                               f"the children {getattr(child, name)}")


def _nestable(cfg: ModelConfig, what: str) -> None:
    if cfg.family not in ("gpt", "fractal"):
        raise FractalError(f"{what} needs dense (family gpt) or FractalFormer runs, not family {cfg.family}")
    if cfg.nesting.residual != "none":
        raise FractalError(f"{what} needs runs without cross-level residuals "
                           f"(residual={cfg.nesting.residual}): their sub-models are not standalone")


def parent_config(child: ModelConfig, split: int, attn_nesting: str = "heads", depth: int = 1,
                  glue_rank: int = 0) -> ModelConfig:
    """The FractalFormer whose level-1 sub-models have ``child``'s shape (``depth`` times deeper)."""
    nesting = child.nesting.attn_nesting if child.family == "fractal" else attn_nesting
    if child.family == "fractal" and child.nesting.split != split:
        raise FractalError(f"FractalFormer runs of split {child.nesting.split} nest only "
                           f"{child.nesting.split} at a time, not {split}")
    heads = nesting == "heads"
    return child.replace(
        family="fractal", levels=child.nesting.levels + 1, split=split, attn_nesting=nesting,
        level_weights=[], distill=0.0, glue_rank=glue_rank, d_model=child.d_model * split,
        n_layer=child.n_layer * depth,
        n_head=child.n_head * (split if heads else 1), n_kv_head=child.n_kv_head * (split if heads else 1),
        head_dim=child.head_dim * (1 if heads else split))


def merge_models(children: list[GPT], attn_nesting: str = "heads", glue_rank: int = 0) -> FractalFormer:
    """A FractalFormer whose level-1 sub-model ``j`` is ``children[j]``, glue blocks zero.

    ``attn_nesting`` applies to dense children (FractalFormer children keep theirs);
    ``glue_rank > 0`` adds low-rank glue maps (which start adding nothing).
    """
    if len(children) < 2:
        raise FractalError(f"merge needs at least 2 runs, got {len(children)}")
    children = [fold_glue(c) for c in children]
    first = children[0].config
    for i, c in enumerate(children[1:], 2):
        if c.config.vocab_size != first.vocab_size:
            raise FractalError(f"run {i} has vocab_size {c.config.vocab_size}, run 1 {first.vocab_size}: "
                               "merged runs must share one vocabulary")
        if c.config.n_layer != first.n_layer:
            raise FractalError(f"run {i} has depth {c.config.n_layer} (n_layer), run 1 {first.n_layer}: "
                               "merged runs must have one depth")
        mine, theirs = c.config.flat_values(), first.flat_values()
        diff = [k for k in mine if k not in ("level_weights", "distill")  # training objectives may differ
                and mine[k] != theirs[k]]
        if diff:
            raise FractalError(f"run {i} differs from run 1 in {', '.join(diff)} "
                               f"({mine[diff[0]]} vs {theirs[diff[0]]}): "
                               "merged runs must have one shape")
    _nestable(first, "merge")
    cfg = parent_config(first, len(children), attn_nesting, glue_rank=glue_rank)
    cfg.validate()
    parent = FractalFormer(cfg).to(children[0].embed.weight.device)
    _check_parent_shape(parent, first)
    states = [dict(c.named_parameters()) for c in children]
    with torch.no_grad():
        for name, p, dims in nested_parameters(parent):
            p.zero_()
            parent.nest.put(p, 1, dims, torch.stack([s[name].detach() for s in states]))
    return parent.train(children[0].training)


def grow_model(model: GPT, width: int, depth: int = 1) -> FractalFormer:
    """A FractalFormer ``width`` times as wide (and ``depth`` times as deep) computing the
    same function as ``model``, which is its sub-model (1, 0) (with ``depth``: sub-model
    (1, 0) is ``model`` with identity layers inserted)."""
    model = fold_glue(model)
    c = model.config
    _nestable(c, "grow")
    if width < 2 or depth < 1:
        raise FractalError(f"grow needs --width >= 2 and --depth >= 1, got {width} and {depth}")
    if c.family == "fractal" and c.nesting.attn_nesting != "heads":
        raise FractalError("grow needs attn_nesting=heads: with head_dim nesting the wider heads' "
                           "RoPE frequencies and softmax scale change the function")
    cfg = parent_config(c, width, "heads", depth)
    cfg.validate()
    grown = FractalFormer(cfg).to(model.embed.weight.device)  # new layers keep their random q/k/v, MLP in
    old = dict(model.named_parameters())
    with torch.no_grad():
        for name, p, dims in nested_parameters(grown):
            if name.startswith("blocks."):
                layer, rest = name.split(".", 2)[1:]
                if int(layer) % depth:  # an inserted layer: identity through zero output projections
                    if rest.startswith(("attn.o.", "mlp.down.")):
                        p.zero_()
                    continue
                name = f"blocks.{int(layer) // depth}.{rest}"
            p.zero_()
            grown.nest.put(p, 1, dims, old[name].detach().expand(width, *old[name].shape))
        # only copy 0 reaches the tied output: the others' final scale (1 + w) is 0
        scale = grown.nest.take(grown.norm.weight, 1, grown.norm.nest_dims["weight"])
        scale[1:] = -1.0
        grown.nest.put(grown.norm.weight, 1, grown.norm.nest_dims["weight"], scale)
    return grown.train(model.training)


# -- run folders ---------------------------------------------------------------------------
def write_new_run(out: Path, cfg: RunConfig, model: torch.nn.Module, tok: Tokenizer, data_sha256: str | None,
                  provenance: dict[str, Any] | None = None) -> None:
    """Write ``model`` as an ordinary run folder at step 0 with a fresh training state (what
    extract, merge and grow make), so ``train --out DIR --resume`` trains it further.

    ``data_sha256`` (the text the source runs trained on) lets that training notice a
    changed data file; ``provenance`` (where the weights came from) goes to provenance.json.
    """
    cfg.validate()
    check_training_fits(cfg)
    save_run_config(out, cfg, tok, data_sha256)
    if provenance is not None:
        write_json(out / "provenance.json", provenance)
    ckpt.save_checkpoint(out, dict(model.state_dict()), make_optimizer(model, cfg),
                         {"step": 0, "elapsed_s": 0.0})


def train_overrides(train: TrainConfig, sets: list[str] | None) -> TrainConfig:
    """``train`` with ``key=value`` overrides of training keys (the model comes from the runs)."""
    values = parse_set(sets or [])
    for key in values:
        if find_key(key).part != "train":
            raise FractalError(f"--set {key}: merge and grow take training keys only (the model's shape "
                               "comes from the runs)")
    cfg = RunConfig(train=dataclasses.replace(train))
    apply_overrides(cfg, values)
    return cfg.train


def merge_runs(runs: list[str | Path], out: str | Path, glue_steps: int = 0, then_steps: int = 0,
               attn_nesting: str = "heads", routing: str | None = None, glue_rank: int = 0,
               sets: list[str] | None = None, progress: bool = True) -> FractalFormer:
    """``fractalformer merge``: write the merged run, train the glue, then everything.

    ``routing`` None: ``shard`` when run ``j`` trained on data shard ``j/N`` (each child keeps
    reading its own shard), else ``shared``. ``sets`` (``key=value``) override training keys
    of the first run's config (its lr, batch size, ...). Low-rank glue (``glue_rank > 0``) is folded
    into the weights after its training, so the run folder ends as a plain FractalFormer.
    """
    out = Path(out)
    check_run_dir(out, resume=False)
    loaded = [load(r) for r in runs]
    tok = loaded[0].tokenizer
    for i, m in enumerate(loaded[1:], 2):
        if m.config.vocab_size == loaded[0].config.vocab_size and m.tokenizer.to_dict() != tok.to_dict():
            raise FractalError(f"run {i} ({runs[i - 1]}) uses another tokenizer ({m.tokenizer.name}) than "
                               f"run 1 ({tok.name}): merged runs must share one")
    merged = merge_models([m.model for m in loaded], attn_nesting, glue_rank if glue_steps else 0)
    k = len(loaded)
    shards = [m.run_config.train.shard() for m in loaded]
    t0 = train_overrides(loaded[0].run_config.train, sets)
    if routing is None:
        routing = ("shard" if shards == [(j, k) for j in range(k)]
                   and t0.batch_size % merged.nest.count(merged.nest.levels - 1) == 0 else "shared")
    glue = glue_steps > 0
    train_cfg = dataclasses.replace(t0, data_shard=[], routing=routing, freeze="children" if glue else "none",
                                    schedule_start=0, max_steps=glue_steps or then_steps or t0.max_steps,
                                    groups="", emergent_every=0)
    cfg = RunConfig(merged.config, train_cfg)
    cfg.validate()
    data_sha256 = load_data_sha256(Path(runs[0]))
    with claim_run_dir(out, resume=False):
        write_new_run(out, cfg, merged, tok, data_sha256,
                      {"merged_from": [str(r) for r in runs], "glue_steps": glue_steps,
                       "glue_rank": glue_rank, "then_steps": then_steps})
        if glue:  # the full training follows: score the whole validation split only after it
            glue_cfg = (RunConfig(cfg.model, dataclasses.replace(cfg.train, final_eval=0)) if then_steps
                        else cfg)
            train(glue_cfg, out, resume=True, progress=progress)
            if cfg.model.nesting.glue_rank:  # fold: from here a plain FractalFormer (fresh optimizer state)
                plain = fold_glue(load(out).model)
                cfg.model = plain.config
                save_run_config(out, cfg, tok, load_data_sha256(out))
                elapsed = ckpt.read_train_info(out).get("elapsed_s", 0.0)
                ckpt.save_checkpoint(out, dict(plain.state_dict()), make_optimizer(plain, cfg),
                                     {"step": glue_steps, "elapsed_s": elapsed})
            # the full training gets a schedule of its own, starting where the glue stopped
            cfg.train = dataclasses.replace(cfg.train, freeze="none", schedule_start=glue_steps,
                                            max_steps=glue_steps + then_steps)
        if then_steps:
            train(cfg, out, resume=True, progress=progress)
        return load(out).model


def grow_run(run: str | Path, out: str | Path, width: int, depth: int = 1, steps: int = 0,
             sets: list[str] | None = None, progress: bool = True) -> dict[str, float]:
    """``fractalformer grow``: write the grown run (step 0), optionally train it further
    (``sets``: training-key overrides, as for :func:`merge_runs`).

    Returns the original's and the grown model's validation loss at the growth step (the
    run's fixed validation batches), in nats/token and bits/char.
    """
    out = Path(out)
    check_run_dir(out, resume=False)
    trained = load(run)
    model = trained.model
    grown = grow_model(model, width, depth).eval()
    t = train_overrides(trained.run_config.train, sets)
    train_cfg = dataclasses.replace(t, data_shard=[], routing="shared", freeze="none", schedule_start=0,
                                    max_steps=steps or t.max_steps, groups="", emergent_every=0)
    cfg = RunConfig(grown.config, train_cfg)
    cfg.validate()
    check_training_fits(cfg)  # before the validation batches of batch_size rows are drawn
    _, corpus = prepare_data(cfg, trained.tokenizer, load_data_sha256(Path(run)))
    batches = fixed_val_batches(corpus, t.eval_batches, t.batch_size, cfg.model.block_size, t.seed)
    figures = {}
    for who, m in (("original", model), ("grown", grown)):
        loss = mean_losses(m, batches, ensembles=False)[0][(0, 0)]
        figures |= {f"{who}_val_loss": loss, f"{who}_val_bpc": to_bpc(loss, corpus.val_units_per_token)}
    with claim_run_dir(out, resume=False):
        write_new_run(out, cfg, grown, trained.tokenizer, corpus.sha256,
                      {"grown_from": str(run), "width": width, "depth": depth, **figures})
        if steps:
            train(cfg, out, resume=True, progress=progress)
        return figures


def grow_concept_run(run: str | Path, out: str | Path, combo: int = 4, steps: int = 0,
                     sets: list[str] | None = None, progress: bool = True) -> GPT:
    """``fractalformer grow`` of a ``family=concept`` run: one more concept level on top
    (``combo`` units of the old top level each; the grown model computes the same logits at
    the growth step), written as a run at step 0 and optionally trained ``steps`` steps
    (``sets``: training-key overrides, as for :func:`grow_run`)."""
    out = Path(out)
    check_run_dir(out, resume=False)
    trained = load(run)
    model = trained.model
    if not isinstance(model, ConceptGPT):
        raise FractalError(f"a concept level needs a family=concept run, not family {model.config.family}")
    if combo < 2:
        raise FractalError(f"--combo must be at least 2, got {combo}")
    grown = grow(model, combo)
    t = train_overrides(trained.run_config.train, sets)
    cfg = RunConfig(grown.config, dataclasses.replace(t, max_steps=steps or t.max_steps, schedule_start=0))
    with claim_run_dir(out, resume=False):
        write_new_run(out, cfg, grown, trained.tokenizer, load_data_sha256(Path(run)),
                      {"grown_from": str(run), "combo": combo})
        if steps:
            train(cfg, out, resume=True, progress=progress)
            return load(out).model
        return grown
