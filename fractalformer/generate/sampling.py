"""Autoregressive sampling.

The model always sees the last ``block_size`` tokens. With the KV cache each new token
costs one single-position forward while the text fits in the context; once it no
longer fits, the window slides and every step recomputes the window, so cached and
uncached generation give the same tokens.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..data.tokenizers import Tokenizer
from ..errors import FractalError
from ..nn.decode import frozen_weights, memo

# Below this temperature sampling takes the argmax: the tempered distribution is one-hot to
# float32 precision anyway (logit gaps under ~1e-4 aside), and dividing the logits by a far
# smaller temperature overflows them to inf (a nan distribution).
GREEDY_BELOW = 1e-6
SEED_LIMIT = 2**63  # seeds lie in [0, 2^63), as fresh_seed draws them (a signed 64-bit integer)


def is_greedy(temperature: float) -> bool:
    """Whether ``temperature`` samples the argmax (0, or too small to divide by safely)."""
    return temperature < GREEDY_BELOW


def probabilities(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """The distribution sampling draws from: temperature, then top-k, then top-p.

    Greedy temperatures (:func:`is_greedy`) return the plain softmax; only its argmax is used.
    Top-p always keeps the likeliest token, so no ``top_p`` > 0 empties the distribution.
    """
    logits = logits.float()
    if is_greedy(temperature):
        return logits.softmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest set reaching top_p
        drop[..., 0] = False  # (a top_p below float32's smallest number would drop every token)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, vocab); temperature 0 means greedy."""
    if is_greedy(temperature):
        return logits.argmax(-1)
    return pick(probabilities(logits, temperature, top_k, top_p), temperature, generator)


def pick(scores: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Draw from ``scores`` (probabilities), or take their argmax when greedy."""
    if is_greedy(temperature):
        return scores.argmax(-1)
    return torch.multinomial(scores, 1, generator=generator).squeeze(-1)


def fresh_seed() -> int:
    """A random seed that leaves torch's global generator alone."""
    return int.from_bytes(os.urandom(8), "little") % SEED_LIMIT


def extracted(model: torch.nn.Module, level: int, index: int) -> torch.nn.Module:
    """``model.extract(level, index)``, kept for the rest of the open :class:`frozen_weights`
    block (a server's decode loop, a caller's loop over many generations), extracted afresh
    in a new block, so no write to the weights between blocks can leave a stale copy."""
    return memo(model, ("extract", level, index), (), lambda: model.extract(level, index).eval())


def runner(model: torch.nn.Module, level: int, index: int | str) -> tuple[torch.nn.Module, int, int | str]:
    """What decodes sub-model ``(level, index)``: a lone sub-model that stands alone runs as
    its extracted dense model, which reads only its own weights (a width-32 sub-model of the
    default model: 1/16 of them) instead of computing its whole level."""
    alone = level > 0 and model.extractable(level) and model.needed_levels(level) == [level]
    if index != "ensemble" and alone:
        return extracted(model, level, int(index)), 0, 0
    return model, level, index


# torch.compile of each family's forward, per backend: compiled unbound, so that nothing
# compiled holds a model; dynamo keeps one graph per model and input shape under it
_COMPILED: dict[tuple[Callable[..., Any], str], Callable[..., Any]] = {}


def decode_fn(model: torch.nn.Module, compile: bool | str) -> Callable[..., dict[int, torch.Tensor]]:
    """The model's forward, or with ``compile`` its ``torch.compile``. The KV cache is
    addressed by position, so one graph per input shape covers every cache length: 2-3x
    fewer milliseconds per token on a CPU, where an eager step is mostly per-op overhead,
    for a compile that can take minutes on a CPU (docs/performance.md). A string names the
    ``torch.compile`` backend (the tests trace with ``"aot_eager"``: no C++ compilation)."""
    if not compile:
        return model
    backend = compile if isinstance(compile, str) else "inductor"
    key = (type(model).forward, backend)
    if key not in _COMPILED:
        # dynamo counts graphs per code object, so the target and every extracted draft (all
        # ``GPT.forward``) share its limit of 8: speculation would fall back to eager silently
        cfg = torch._dynamo.config  # the limit's name before torch 2.6: cache_size_limit
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
        _COMPILED[key] = torch.compile(type(model).forward, dynamic=True, backend=backend)  # lengths vary
    return functools.partial(_COMPILED[key], model)


def select_logits(logits: dict[int, torch.Tensor], level: int, index: int | str) -> torch.Tensor:
    """Last-position logits of sub-model ``(level, index)``, or of the level's ensemble
    (``index == "ensemble"``: mean of the sub-models' log-probabilities)."""
    lg = logits[level][:, :, -1]  # (count, B, vocab)
    if index == "ensemble":
        return torch.log_softmax(lg.float(), -1).mean(0)
    return lg[int(index)]


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_cache: bool = True, level: int = 0, index: int | str = 0, compile: bool | str = False
             ) -> Iterator[int]:
    """Yield ``max_new_tokens`` token ids continuing ``prompt`` (a non-empty id list).

    ``level``/``index`` pick the sub-model that speaks (``index="ensemble"``: the whole
    level at once); only the levels it depends on are computed. ``compile``: run the
    forward through ``torch.compile`` (:func:`decode_fn`; pays off over long generations).
    """
    if not prompt:
        raise ValueError("generation needs at least one prompt token")
    model.eval()
    model.nest.check(level, 0 if index == "ensemble" else int(index))
    device = next(model.parameters()).device
    ctx = model.config.block_size
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else fresh_seed())
    scope = frozen_weights()  # weight slices gathered once for the whole generation
    tokens = list(prompt[-ctx:])
    with scope:
        model, level, index = runner(model, level, index)
        levels = model.needed_levels(level)
        caches = model.new_cache(1, levels) if use_cache else None
        run = decode_fn(model, compile)
        logits = run(torch.tensor([tokens], device=device), levels, caches)
    for _ in range(max_new_tokens):
        nxt = int(sample_next(select_logits(logits, level, index), temperature, top_k, top_p, gen))
        yield nxt
        tokens.append(nxt)
        with scope:
            if caches is not None and len(tokens) <= ctx:
                logits = run(torch.tensor([[nxt]], device=device), levels, caches)
            else:  # the window slides: recompute it (exactly what an uncached model sees)
                tokens = tokens[-ctx:]
                if caches is not None:
                    for c in caches.values():
                        c.reset()
                logits = run(torch.tensor([tokens], device=device), levels, caches)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   seed: int | None = None) -> None:
    """Reject sampling settings that would crash or silently mean something else."""
    if not math.isfinite(temperature) or temperature < 0:
        raise FractalError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise FractalError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise FractalError(f"top_p must lie in (0, 1], got {top_p}")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise FractalError(f"seed must lie in 0 .. 2^63 - 1, got {seed}")


def stream_text(model: torch.nn.Module, tok: Tokenizer, prompt: str, max_new_tokens: int = 200, *,
                temperature: float = 0.8,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                level: int = 0, index: int | str = 0, on_unknown: str = "error",
                use_cache: bool = True, compile: bool | str = False) -> Iterator[str]:
    """Text pieces continuing ``prompt``, one per token, from sub-model ``(level, index)``.

    Every argument is checked here, before the first piece, so a caller can print an error
    before echoing anything. The defaults are the command line's.
    """
    check_sampling(temperature, top_k, top_p, seed)
    model.nest.check(level, 0 if index == "ensemble" else int(index))
    ids = tok.encode(prompt, on_unknown=on_unknown)
    if not ids:
        raise FractalError("the prompt is empty")
    decode = tok.stream_decoder()
    tokens = generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed, use_cache=use_cache,
                      level=level, index=index, compile=compile)
    return (decode(i) for i in tokens)
