"""Export a run (or one extracted sub-model) as a Hugging Face Llama-family model folder.

Our dense GPT is a Llama with three differences, all folded into the weights or config:

* RMSNorm scales by ``(1 + w)``; Llama's by ``w``: the exported weight is ``1 + w``.
* GeGLU (tanh-approximated GELU) with biases: ``hidden_act="gelu_pytorch_tanh"`` and
  ``mlp_bias=True``; our fused ``gate_up`` weight splits into ``gate_proj`` / ``up_proj``.
* One fused ``qkv`` projection: it splits into ``q_proj`` / ``k_proj`` / ``v_proj``.

RoPE needs no permutation: both pair dim ``i`` with ``i + head_dim / 2`` (rotate-half) and
use ``theta ** (-2i / head_dim)``. Embeddings are tied, grouped-query heads map to
``num_key_value_heads`` and ``head_dim`` is given explicitly (ours need not be
``d_model / n_head``). A nested sub-model is exported through :meth:`GPT.extract`, which
makes it a dense GPT of its own. The tokenizer goes along as a ``tokenizers`` /
``transformers`` fast tokenizer, so ``AutoTokenizer`` loads it too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .data.tokenizers import Tokenizer
from .errors import FractalError
from .models import GPT


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise FractalError("export needs the hf extra (transformers is missing): "
                           "pip install 'fractalformer[hf]'") from None
    transformers.utils.logging.disable_progress_bar()  # export prints one line of its own
    return transformers


def dense_model(model: GPT, level: int | None, index: int | None) -> GPT:
    """The dense GPT to export: the model itself, or sub-model ``(level, index)``."""
    c = model.config
    if c.family == "moe":
        raise FractalError("family moe has no Llama equivalent (product-key layers): it cannot be exported")
    if c.family == "concept":
        raise FractalError("family concept has no Llama equivalent (concept levels above the tokens): "
                           "it cannot be exported")
    if c.token_window:
        raise FractalError(f"token_window {c.token_window} (a sliding window) has no Llama equivalent: "
                           "the run cannot be exported")
    if (level is None) != (index is None):
        raise FractalError("--level and --index go together")
    if level is None:
        if c.family == "gpt":
            return model
        level, index = 0, 0
    if c.family == "mrl" and level > 0:
        raise FractalError("family mrl nests only the output head: its smaller sizes are no standalone "
                           "transformer to export")
    return model.extract(level, index)


def llama_config(model: GPT) -> Any:
    """The ``LlamaConfig`` of a dense GPT."""
    transformers = _require_transformers()
    c = model.config
    if c.family != "gpt" or c.nesting.levels != 1:
        raise FractalError("only a dense GPT maps onto Llama; extract a sub-model first")
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, hidden_act="gelu_pytorch_tanh", max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, attention_bias=False, mlp_bias=c.mlp_bias,
        attention_dropout=0.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, initializer_range=c.init_std, torch_dtype="float32",
    )


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our dense GPT's weights under Llama's names and conventions."""
    c = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    out = {"model.embed_tokens.weight": sd["embed.weight"], "lm_head.weight": sd["embed.weight"],
           "model.norm.weight": 1.0 + sd["norm.weight"]}
    for i in range(c.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attn.qkv.weight"].split([q, kv, kv])
        gate, up = sd[p + "mlp.gate_up.weight"].chunk(2)
        out |= {h + "input_layernorm.weight": 1.0 + sd[p + "attn_norm.weight"],
                h + "post_attention_layernorm.weight": 1.0 + sd[p + "mlp_norm.weight"],
                h + "self_attn.q_proj.weight": wq, h + "self_attn.k_proj.weight": wk,
                h + "self_attn.v_proj.weight": wv, h + "self_attn.o_proj.weight": sd[p + "attn.o.weight"],
                h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                h + "mlp.down_proj.weight": sd[p + "mlp.down.weight"]}
        if c.mlp_bias:
            gb, ub = sd[p + "mlp.gate_up.bias"].chunk(2)
            out |= {h + "mlp.gate_proj.bias": gb, h + "mlp.up_proj.bias": ub,
                    h + "mlp.down_proj.bias": sd[p + "mlp.down.bias"]}
    return {k: v.contiguous() for k, v in out.items()}


def to_llama(model: GPT) -> Any:
    """A ``LlamaForCausalLM`` computing what our dense GPT computes (eval mode, fp32)."""
    transformers = _require_transformers()
    hf = transformers.LlamaForCausalLM(llama_config(model))
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:  # lm_head is tied to the embedding
        raise FractalError(f"Llama mapping is incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.eval()


def hf_tokenizer(tok: Tokenizer, max_len: int) -> Any:
    """Our tokenizer as a ``transformers`` fast tokenizer (same ids, same text)."""
    transformers = _require_transformers()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok.to_hf(), model_max_length=max_len,
                                                clean_up_tokenization_spaces=False)


def export(model: GPT, tok: Tokenizer, out: str | Path, level: int | None = None,
           index: int | None = None) -> GPT:
    """Write the Hugging Face folder ``out`` (model, config, tokenizer); returns the dense GPT.

    Everything is written to a temporary folder beside ``out`` and renamed into place,
    so an interrupted export leaves nothing behind.
    """
    out = Path(out)
    if out.exists():
        raise FractalError(f"{out} already exists; choose another --out")
    dense = dense_model(model, level, index)
    hf = to_llama(dense)
    hf_tok = hf_tokenizer(tok, dense.config.block_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dense
