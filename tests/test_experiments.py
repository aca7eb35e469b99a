"""What the experiments' tables rest on: their own forward paths and corpus plumbing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments.reach_experiment import CHUNK, reach_forward
from fractalformer.config import build_config
from fractalformer.data import prepared as prep
from fractalformer.errors import FractalError
from fractalformer.models import build_model
from fractalformer.runs import prepare_data
from harness import data_sets


def concept_model(ctx: int) -> torch.nn.Module:
    """The ``concept`` preset's shape at tiny width, its read path open (read_scale 1)."""
    torch.manual_seed(0)
    sets = ["family=concept", "concept_levels=2", "combo=4", "combiner=linear", "concept_share=true",
            "concept_read_init=1", "dropout=0", f"block_size={ctx}"]
    return build_model(build_config("tiny", None, sets).model).eval()


@torch.no_grad()
def test_reach_forward_is_causal_and_reads_the_text_before_its_chunk() -> None:
    ctx = 1024
    model = concept_model(ctx)
    x = torch.randint(0, 128, (1, ctx))
    ref, _ = reach_forward(model, x)  # (1, B, CHUNK, V): the last chunk's logits
    assert ref.shape[-2] == CHUNK
    start = ctx - CHUNK
    for p in (3, 100, CHUNK - 1):  # a change inside the chunk leaves its earlier logits alone
        y = x.clone()
        y[0, start + p] = (y[0, start + p] + 1) % 128
        out, _ = reach_forward(model, y)
        torch.testing.assert_close(out[..., :p, :], ref[..., :p, :], rtol=0, atol=1e-6)
        assert not torch.allclose(out[..., p, :], ref[..., p, :])
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 128  # 758 tokens before the chunk: reached through the top level
    out, _ = reach_forward(model, y)
    assert not torch.allclose(out, ref)


@torch.no_grad()
def test_reach_forward_over_one_chunk_is_the_models_forward() -> None:
    model = concept_model(CHUNK)
    x = torch.randint(0, 128, (2, CHUNK))
    out, _ = reach_forward(model, x)
    torch.testing.assert_close(out[0], model(x, [0])[0][0], rtol=1e-5, atol=1e-5)


def test_data_sets_train_on_a_prepared_corpus_with_its_own_tokenizer(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 40)
    prep.prepare([str(src)], "byte", tmp_path / "corpus", progress=False, split="files")
    sets = data_sets(tmp_path / "corpus")
    assert sets == [f"data={tmp_path / 'corpus'}", "tokenizer=byte", "vocab_size=256"]
    tok, corpus = prepare_data(build_config("tiny", None, [*sets, "block_size=32"]))
    assert tok.name == "byte" and len(corpus.val) > 0
    with pytest.raises(FractalError, match="tokenizer"):  # without them the corpus is refused
        prepare_data(build_config("tiny", None, [f"data={tmp_path / 'corpus'}"]))
