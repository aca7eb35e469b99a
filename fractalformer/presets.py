"""Named base configurations for ``fractalformer train --preset NAME``.

Each is a set of config keys (flat names, see config.py) applied on the defaults before a
TOML file and ``--set``. Plain data, so that ``fractalformer --help`` lists them without
importing anything else.
"""

from __future__ import annotations

from typing import Any

_TINY = dict(block_size=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, batch_size=8,
             max_steps=20, warmup_steps=2, eval_every=10, eval_batches=2, ckpt_every=10, sample_tokens=40)

PRESETS: dict[str, dict[str, Any]] = {
    # The FractalFormer: the seed's dims, 3 levels of block nesting (1 + 2 + 4 sub-models).
    # Whole-head nesting with 4 KV heads; every sub-model every step, half the loss on the
    # full model (the rest shared by the levels below): the best of the recipes measured
    # against dense twins (python -m experiments.recipes; docs/fractalformer.md).
    "default": dict(family="fractal", levels=3, split=2, attn_nesting="heads", n_kv_head=4,
                    level_weights=[2.0, 1.0, 1.0],
                    max_steps=700, eval_every=175, ckpt_every=175),
    # The seed FractalFormer's dimensions trained densely: the reference model.
    "dense": {},
    # A wider FractalFormer whose decode step is bound by reading weights, so its nested
    # drafts (width 256 and 128) are much cheaper than the full model: speculative decoding.
    # Trained in bf16 autocast (2.5x faster than fp32 on an AVX512-BF16 CPU), with
    # self-distillation so that the drafts agree with the full model (docs/speculative.md).
    "fractal-512": dict(family="fractal", levels=3, split=2, attn_nesting="heads", d_model=512, n_head=8,
                        n_kv_head=4, head_dim=64, distill=0.5, batch_size=8, dtype="bfloat16",
                        max_steps=1500, lr=1e-3, min_lr=1e-4, eval_every=250, ckpt_every=250),
    # The seed matryoshkaGPT: char tokens, d 32, an MRL head at widths 32/16/8/4/2.
    "matryoshka": dict(family="mrl", levels=5, split=2, tokenizer="char", vocab_size=65, d_model=32,
                       n_layer=4, n_head=4, n_kv_head=4, head_dim=8, block_size=128, batch_size=32,
                       max_steps=1500, eval_every=250, ckpt_every=500),
    # Product-key sparse layers in place of the MLP (models/moe.py, docs/moe.md): the dense
    # reference's dims and schedule; the sparse layer in layers 1 and 3.
    "peer": dict(family="moe", moe="peer", moe_layers=[1, 3], n_experts=65536, moe_heads=4, moe_topk=8),
    "pkm": dict(family="moe", moe="pkm", moe_layers=[1, 3], n_experts=65536, moe_heads=4, moe_topk=8),
    "fhme": dict(family="moe", moe="fhme", moe_layers=[1, 3], n_experts=16384, moe_heads=4, moe_topk=8,
                 fhme_depth=3),
    # Next-concept levels above the tokens (models/concept.py, docs/concept.md): the dense
    # reference's dims and schedule for the token level; one concept per 4 tokens, and per
    # 16 tokens, each a causal transformer read by cross-attention from the level below.
    # One stack of blocks serves every level (with a level embedding): the best row of the
    # ablation (-0.096 bits/char against separate weights at 300 steps, 39% of the parameters).
    "concept": dict(family="concept", concept_levels=2, combo=[4], combiner="linear", concept_share=True),
    # On UTF-8 bytes (no tokenizer): concepts of 4, 16 and 64 bytes; 512-byte windows, batch 8,
    # so a step reads the dense reference's 4,096 units. Lean: 2 shared blocks for
    # the bytes, the first of them for each concept level, plans added - 0.63x a dense byte
    # step's FLOPs; at equal FLOPs 2.42-2.46 bits/byte against 4-block dense byte's 2.66-2.68.
    "concept-byte": dict(family="concept", tokenizer="byte", vocab_size=256, concept_levels=3, combo=[4],
                         combiner="linear", block_size=512, batch_size=8, concept_share=True, n_layer=2,
                         concept_layers=1, concept_read="add"),
    # Few-thousand-parameter models for tests and smoke runs.
    "tiny": _TINY,
    "tiny-fractal": {**_TINY, "family": "fractal", "levels": 3, "n_kv_head": 4, "attn_nesting": "heads"},
    # A 10.4M-parameter FractalFormer (1 + 2 + 4 sub-models) for corpora beyond TinyShakespeare:
    # a 4096-token byte-level BPE; python -m bench.bench_10m trains it on a prepared corpus.
    "10m": dict(family="fractal", levels=3, split=2, attn_nesting="heads", d_model=384, n_layer=4, n_head=8,
                n_kv_head=4, head_dim=48, tokenizer="bpe:4096", vocab_size=4096, batch_size=16, lr=1e-3,
                min_lr=1e-4, max_steps=2000, eval_every=250, ckpt_every=250),
}
