"""Every training loss, computed from the logits a model's forward returned.

Models compute logits (and what a loss reads besides, left by the same forward); the
recipes live here, so the trainer, DDP / FSDP (which see one forward) and the scripts
all train on the same objective:

* the cross-entropy of every sub-model, weighted by ``model.weights`` (``level_weights``),
  or of the step's sample of them (``sampling``: :func:`step_weights`);
* soft group targets (``groups``, ``fractalformer.hierarchy``): a sub-model learns the mean
  log-probability of the target's token group instead of the token itself;
* self-distillation (``distill``): each smaller sub-model also moves towards the full
  model's detached distribution (KL);
* the family's own term, from its last training forward: the MoE's ponder cost (FHME
  adaptive depth) and usage loss, the concept model's next-concept regression and chunking.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..hierarchy import group_key, target_matrix
from ..models import GPT, ConceptGPT, MoEGPT
from ..models.concept import Chunks, Prediction
from ..models.fractal import Mix
from ..models.gpt import batch_rows
from ..nn.norms import widen

GroupTargets = dict[int, torch.Tensor]  # level -> (count, vocab, vocab): row y of j = sub-model j's target


def group_targets(model: GPT, groups: dict[int | str, list[list[int]]]) -> GroupTargets:
    """Soft targets spread over token groups, per level, on the model's device.

    Key ``W``: every sub-model of width W; ``"W.j"``: sub-model j of that width alone.
    Sub-models not named keep plain cross-entropy (no entry, or the identity row).
    """
    device, vocab = model.embed.weight.device, model.config.vocab_size
    by_sub = {group_key(k): g for k, g in groups.items()}
    out = {}
    for lv in range(model.nest.levels):
        w = model.level_width(lv)
        per = [by_sub.get((w, j), by_sub.get((w, -1))) for j in range(model.nest.count(lv))]
        if any(g is not None for g in per):
            out[lv] = torch.stack([target_matrix(g or [], vocab) for g in per]).to(device)
    return out


def training_loss(model: GPT, logits: dict[int, torch.Tensor], targets: torch.Tensor,
                  groups: GroupTargets | None = None, weights: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, sub_losses)``: the weighted objective over every sub-model in ``logits`` plus
    the family's term, and each sub-model's own mean cross-entropy (level by level, index by
    index; detached; NaN for the sub-models of levels not in ``logits``).

    ``targets`` is (B, T), or (levels, B, T) for routed data (as the forward's ``idx``).
    ``weights`` (one per sub-model, summing to 1 over those in ``logits``) replaces
    ``model.weights``: the step's sample of sub-models (``sampling``, :func:`step_weights`).
    """
    per_level, sub = level_losses(model, logits, targets, groups or {}, weights)
    loss = torch.stack(list(per_level.values())).sum()
    aux = family_loss(model, targets)
    return (loss if aux is None else loss + aux), sub


def level_losses(model: GPT, logits: dict[int, torch.Tensor], targets: torch.Tensor,
                 groups: GroupTargets, weights: torch.Tensor | None = None
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Each level's weighted cross-entropy (soft over ``groups``, with distillation) - the
    parts whose gradients ``level_grads=pcgrad`` reconciles - and every sub-model's plain
    cross-entropy (NaN where its level did not run)."""
    d = model.config.nesting.distill
    teacher = F.log_softmax(widen(logits[0][0].detach()), -1) if d and 0 in logits else None  # (B, T, V)
    w = model.weights if weights is None else weights
    offsets = [0, *itertools.accumulate(model.nest.counts())]  # level lv's sub-models: offsets[lv:lv + 2]
    sub = torch.full((offsets[-1],), float("nan"), device=w.device)
    per_level = {}
    for lv, lg in sorted(logits.items()):
        y = targets if targets.dim() == 2 else batch_rows(targets[lv], lg.shape[0])
        y = y.expand(lg.shape[0], *y.shape[-2:]).flatten()
        logp = F.log_softmax(widen(lg), -1)
        if lv in groups:  # soft targets: -mean log p over the target's group
            tm = groups[lv]
            soft = tm[torch.arange(len(tm), device=y.device)[:, None], y.view(len(tm), -1)]
            ce = -(soft.flatten(0, 1) * logp.flatten(0, 2)).sum(-1)
        else:
            ce = F.nll_loss(logp.flatten(0, 2), y, reduction="none")
        ce = ce.view(lg.shape[0], -1).mean(1)
        sub[offsets[lv]:offsets[lv + 1]] = ce.detach()
        if teacher is not None and lv > 0:  # self-distillation: agree with the full model
            kl = (teacher.exp() * (teacher - logp)).sum(-1).flatten(1).mean(1)
            ce = (1 - d) * ce + d * kl
        per_level[lv] = (ce * w[offsets[lv]:offsets[lv + 1]]).sum()
    return per_level, sub


def step_mix(model: GPT, cfg: RunConfig, step: int) -> Mix | None:
    """The Mix'n'Match model step ``step`` also trains (``mix_weight``): a level per layer for
    attention and MLP alike (the MLP alone with ``head_dim`` nesting), drawn from
    ``(seed, step)``; None without ``mix_weight``."""
    if not cfg.train.mix_weight:
        return None
    c = model.config
    gen = torch.Generator().manual_seed(cfg.train.seed * 104_729 + step)
    levels = torch.randint(model.nest.levels, (c.n_layer,), generator=gen).tolist()
    heads = c.nesting.attn_nesting == "heads"
    return model.parse_mix([(lv if heads else 0, lv) for lv in levels])


def mix_loss(logits: dict[int, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a Mix'n'Match model's logits ({0: (1, B, T, V)})."""
    return F.cross_entropy(widen(logits[0][0]).flatten(0, 1), targets.flatten())


def step_weights(cfg: RunConfig, step: int) -> tuple[list[int] | None, torch.Tensor | None]:
    """The levels to run and every sub-model's loss weight at ``step`` under ``sampling``;
    ``(None, None)`` for ``all`` (every level, ``model.weights``).

    A pure function of ``(seed, step)``, so every process, a resumed run and a re-run draw the
    same sub-models. ``level`` (MatFormer): one level, drawn with ``level_probs``, its
    sub-models weighted as usual among themselves. ``sandwich`` (slimmable networks): the
    full model, one sub-model of the smallest level and one of any other nested level,
    weighted alike (in-place distillation is ``distill``); a level none of them is in does
    not run, but the others run whole (a level's sub-models are one batched computation).
    """
    t, m = cfg.train, cfg.model
    if t.sampling == "all":
        return None, None
    levels = m.nesting.levels
    subs = m.sub_models()
    gen = torch.Generator().manual_seed(t.seed * 7_919 + step)
    base = torch.tensor(m.sub_model_weights())
    if t.sampling == "level":
        probs = torch.tensor(t.level_probs or [1.0] * levels, dtype=torch.float64)
        lv = int(torch.multinomial(probs, 1, generator=gen))
        keep = torch.tensor([s[0] == lv for s in subs])
        w = torch.where(keep, base, 0.0)
        return [lv], w / w.sum()
    pick = [0]
    last = [i for i, s in enumerate(subs) if s[0] == levels - 1]
    pick.append(last[int(torch.randint(len(last), (1,), generator=gen))])
    rest = [i for i, s in enumerate(subs) if s[0] > 0 and i != pick[1]]
    pick.append(rest[int(torch.randint(len(rest), (1,), generator=gen))])
    w = torch.zeros(len(subs))
    w[pick] = 1.0 / len(pick)
    return sorted({subs[i][0] for i in pick}), w


def family_loss(model: GPT, targets: torch.Tensor) -> torch.Tensor | None:
    """The family's term of the last training forward, if it has one (``targets``: its next
    tokens, for a term that predicts them)."""
    if not model.training:
        return None
    if isinstance(model, MoEGPT):
        terms = [t for t in (ponder_cost(model), usage_loss(model)) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None
    if isinstance(model, ConceptGPT):
        terms = [t for t in (concept_regression(model, model.last_predictions),
                             chunking_loss(model, model.last_chunks, targets)) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None
    return None


def chunking_loss(model: ConceptGPT, chunks: Chunks | None, targets: torch.Tensor) -> torch.Tensor | None:
    """``chunk_weight`` times the chunker's own loss: for ``learned``, H-Net's ratio loss, least
    when a share ``1 / chunk_size`` of the units start chunks, both as decided and as scored
    (taken per row and averaged, so that any number of processes computes the same loss);
    for ``entropy``, the encoder's next-unit cross-entropy, which teaches it the entropies
    its boundaries read."""
    c = model.config.concept
    if chunks is None or not c.chunk_weight:
        return None
    if chunks.probs is not None:
        n = c.chunk_size
        f, g = chunks.starts.float().mean(1), chunks.probs.float().mean(1)
        ratio = n / max(n - 1, 1e-6) * ((n - 1) * f * g + (1 - f) * (1 - g))
        return c.chunk_weight * ratio.mean()
    if chunks.logits is not None:
        logits = chunks.logits[0]
        return c.chunk_weight * F.cross_entropy(widen(logits).flatten(0, 1), targets.flatten())
    return None


def ponder_cost(model: MoEGPT) -> torch.Tensor | None:
    """``halt_penalty`` times the mean ponder cost of the adaptive FHME layers: the compute
    penalty that teaches tokens to halt early."""
    c = model.config
    if c.moe.kind != "fhme" or not c.moe.fhme_adaptive or not c.moe.halt_penalty:
        return None
    ponders = [m.ponder for m in model.sparse_layers().values() if m.ponder is not None]
    return c.moe.halt_penalty * torch.stack(ponders).mean() if ponders else None


def usage_loss(model: MoEGPT) -> torch.Tensor | None:
    """``usage_weight`` times the sparse layers' mean usage KL (``nn.product_keys.usage_kl``):
    each row's queries are pushed to spread over all sub-keys, against expert collapse."""
    w = model.config.moe.usage_weight
    if not w:
        return None
    terms = [r.keys.balance for r in model.routers().values() if r.keys.balance is not None]
    return w * torch.stack(terms).mean() if terms else None


def concept_regression(model: ConceptGPT, predictions: list[Prediction]) -> torch.Tensor | None:
    """Weighted next-concept regression of every tier with a head: each plan's predicted
    concept against the (detached) concept it plans, by ``concept_loss``."""
    weights, kind = model.config.concept.weights(), model.config.concept.loss
    total = None
    for tier, pred, target, mask in predictions:
        pred, y = widen(pred), widen(target)
        if kind == "cosine":
            each = 1 - F.cosine_similarity(pred, y, dim=-1)
        elif kind == "mse":
            each = (pred - y).square().mean(-1)
        else:
            each = (pred - y).abs().mean(-1)
        if mask is None:
            loss = each.mean()
        else:  # variable chunks: each row's complete concepts (a mean of rows: any process count)
            loss = ((each[0] * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        loss = weights[tier - 1] * loss
        total = loss if total is None else total + loss
    return total

