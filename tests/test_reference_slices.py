"""Which weights does a sub-model use? Checked against slices cut by hand.

Extraction and the nested forward both go through ``Nesting.take`` and the layers'
segment specs, so a wrong spec (say, gate and up not split per sub-model) would pass
every test that compares the two. Here each sub-model's logits are rebuilt from the raw
parameter tensors, sliced with plain index arithmetic written out per parameter, and run
through a from-scratch dense transformer (no fractalformer layer involved).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fractalformer.config import build_config
from fractalformer.models import build_model


def _block(n: int, j: int, f: int, kind: str) -> list[int]:
    """Entries of a size-``n`` dimension owned by sub-model ``j`` of a level ``f`` times narrower."""
    w = n // f
    start = j * w if kind == "block" else 0
    return list(range(start, start + w))


def _per_segment(sizes: list[int], j: int, f: int, kind: str) -> list[int]:
    """The owned entries inside each consecutive segment of the given sizes."""
    out, offset = [], 0
    for s in sizes:
        out += [offset + i for i in _block(s, j, f, kind)]
        offset += s
    return out


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Half-split rotary embedding of x (H, T, hd), positions 0..T-1, in float64."""
    hd, t = x.shape[-1], x.shape[-2]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()), -1)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def reference_logits(sd: dict[str, torch.Tensor], cfg, level: int, j: int, idx: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) of sub-model (level, j) for one sequence, from hand-cut slices."""
    kind = "prefix" if cfg.family in ("matformer", "mrl") else "block"
    f = cfg.nesting.split**level
    heads = cfg.nesting.attn_nesting == "heads"
    d, hidden, hd0 = cfg.d_model, cfg.mlp_hidden, cfg.head_dim
    nq, nkv = cfg.n_head, cfg.n_kv_head
    D = _block(d, j, f, kind)  # the model-width entries this sub-model owns
    if heads:  # whole heads: a block of query heads and of key/value heads, all dims each
        hq, hkv, hd = nq // f, nkv // f, hd0
        q_rows = [h * hd0 + i for h in range(nq)[j * hq:(j + 1) * hq] for i in range(hd0)]
        k_rows = [h * hd0 + i for h in range(nkv)[j * hkv:(j + 1) * hkv] for i in range(hd0)]
    else:  # every head kept, a block of each head's dims
        hq, hkv, hd = nq, nkv, hd0 // f
        q_rows = _per_segment([hd0] * nq, j, f, kind)
        k_rows = _per_segment([hd0] * nkv, j, f, kind)
    q_size, kv_size = nq * hd0, nkv * hd0
    qkv_rows = q_rows + [q_size + r for r in k_rows] + [q_size + kv_size + r for r in k_rows]
    H = _block(hidden, j, f, kind)
    gate_up_rows = H + [hidden + r for r in H]

    def w(name: str) -> torch.Tensor:
        return sd[name].double()

    x = w("embed.weight")[:, D][idx]  # (T, width)
    t = x.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        a = _rms(x, w(p + "attn_norm.weight")[D], cfg.norm_eps)
        qkv = a @ w(p + "attn.qkv.weight")[qkv_rows][:, D].T
        q, k, v = qkv.split([hq * hd, hkv * hd, hkv * hd], -1)
        q = _rope(q.view(t, hq, hd).transpose(0, 1), cfg.rope_theta)
        k = _rope(k.view(t, hkv, hd).transpose(0, 1), cfg.rope_theta).repeat_interleave(hq // hkv, 0)
        v = v.view(t, hkv, hd).transpose(0, 1).repeat_interleave(hq // hkv, 0)
        att = (q @ k.transpose(1, 2) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(0, 1).reshape(t, hq * hd)
        x = x + y @ w(p + "attn.o.weight")[D][:, q_rows].T
        m = _rms(x, w(p + "mlp_norm.weight")[D], cfg.norm_eps)
        gu = m @ w(p + "mlp.gate_up.weight")[gate_up_rows][:, D].T + w(p + "mlp.gate_up.bias")[gate_up_rows]
        gate, up = gu.chunk(2, -1)
        hid = F.gelu(gate, approximate="tanh") * up
        x = x + hid @ w(p + "mlp.down.weight")[D][:, H].T + w(p + "mlp.down.bias")[D]
    x = _rms(x, w("norm.weight")[D], cfg.norm_eps)
    return x @ w("embed.weight")[:, D].T


CASES = {
    "fractal head_dim MQA": ["family=fractal", "levels=3", "n_head=4", "n_kv_head=1", "head_dim=16"],
    "fractal heads GQA": ["family=fractal", "levels=3", "attn_nesting=heads", "n_head=8", "n_kv_head=4",
                          "head_dim=8"],
    "fractal heads MHA": ["family=fractal", "levels=2", "attn_nesting=heads", "n_head=4", "n_kv_head=4",
                          "head_dim=8"],
    "fractal split 3": ["family=fractal", "levels=3", "split=3", "d_model=36", "n_head=2", "n_kv_head=1",
                        "head_dim=36"],
    "matformer prefix": ["family=matformer", "levels=3", "n_head=4", "n_kv_head=2", "head_dim=16"],
}


TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_sub_model_logits_match_hand_sliced_weights(name: str, dtype: torch.dtype) -> None:
    """In float64 the match is to rounding error: no layer computes in a narrower dtype."""
    cfg = build_config("tiny", None, [*CASES[name], "vocab_size=40", "block_size=16"]).model
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype).eval()
    with torch.no_grad():  # random norm scales and biases too: zeros would hide a wrong slice
        for p in model.parameters():
            p.normal_(0, 0.3)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    tol = TOLERANCE[dtype]
    with torch.no_grad():
        for lv in range(cfg.nesting.levels):
            out = model(idx, [lv])[lv]
            assert out.dtype == dtype
            got = out[:, 0].double()  # (count, T, V)
            for j in range(model.nest.count(lv)):
                ref = reference_logits(sd, cfg, lv, j, idx[0])
                torch.testing.assert_close(got[j], ref, atol=tol, rtol=tol,
                                           msg=lambda m, lv=lv, j=j: f"sub-model ({lv}, {j}): {m}")
                dense = model.extract(lv, j).eval()
                torch.testing.assert_close(dense(idx)[0][0, 0].double(), ref, atol=tol, rtol=tol)
