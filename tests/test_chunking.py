"""Variable chunks in the concept family (chunking = space | entropy | learned): causality
(perturbation, Jacobian, a leaky rule the tests catch, the random-text canary), cached
generation with boundaries decided online, the chunkers' losses, configs and the CLI."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from fractalformer.config import build_config
from fractalformer.generate import generate
from fractalformer.models import build_model
from fractalformer.models import concept as concept_module
from fractalformer.models.concept import Chunks, ConceptGPT, grow, smooth, smooth_step
from fractalformer.nn import chunking
from fractalformer.train import train
from fractalformer.train.losses import chunking_loss, training_loss

from .conftest import assert_resume_is_exact, assert_two_processes_match_one, needs_torchrun, run_cli
from .test_concept import TINY_CONCEPT, jacobian

BYTES = ["tokenizer=byte", "vocab_size=256", "concept_read=add"]
CHUNKINGS = {
    "space": [*BYTES, "chunking=space", "concept_levels=2", "combo=2"],
    "space_encoder": [*BYTES, "chunking=space", "concept_encoder=1"],
    "entropy": [*BYTES, "chunking=entropy", "concept_levels=3", "combo=2", "combiner=linear"],
    "learned": [*BYTES, "chunking=learned", "concept_levels=2", "combo=2"],
    # the concept-byte preset's shape: shared blocks, the first one per concept level
    "learned_shared": [*BYTES, "chunking=learned", "concept_levels=3", "combo=2", "concept_share=true",
                       "concept_layers=1", "combiner=linear"],
}
MODES = ["eval", "train"]
# padding every row to the longest row's chunks: a change after t may change the padded
# shapes, and with them the float rounding of positions <= t; a leak is orders larger
ROUNDING = 1e-5


def tiny(sets: list[str], seed: int = 0) -> ConceptGPT:
    """A tiny byte model with the read path open (read_scale 1): the default closed gate
    would hide a leak until training opens it. The entropy threshold is primed on a batch,
    the router drawn at random (its identity start marks few boundaries in a new model)."""
    torch.manual_seed(seed)
    model = build_model(build_config("tiny", None, ["family=concept", "concept_read_init=1", "dropout=0",
                                                    *sets]).model)
    assert isinstance(model, ConceptGPT)
    if model.router is not None:
        for w in (model.router.q.weight, model.router.k.weight):
            torch.nn.init.normal_(w, std=w.shape[-1] ** -0.5)
    if model.config.concept.chunking == "entropy":
        model.train()(torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(9)))
    return model


def text_ids(rows: int, t: int, seed: int = 1) -> torch.Tensor:
    """Byte ids of random words and spaces: every chunking finds boundaries in it."""
    gen = torch.Generator().manual_seed(seed)
    alphabet = torch.tensor(list(b"abcdefgh  \n,."))
    return alphabet[torch.randint(0, len(alphabet), (rows, t), generator=gen)]


@torch.no_grad()
def leak(model: ConceptGPT, mode: str, t_len: int = 30) -> float:
    """Largest change of the logits at positions <= t when only the bytes after t change."""
    model.train(mode == "train")
    x = text_ids(2, t_len)
    base = model(x, [0])[0][0]
    worst = 0.0
    for t in range(t_len - 1):
        y = x.clone()
        y[:, t + 1:] = text_ids(2, t_len - t - 1, seed=t + 7)
        worst = max(worst, float((model(y, [0])[0][0][:, : t + 1] - base[:, : t + 1]).abs().max()))
    return worst


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CHUNKINGS)
def test_perturbing_the_future_leaves_the_past_unchanged(name: str, mode: str) -> None:
    model = tiny(CHUNKINGS[name])
    assert leak(model, mode) < ROUNDING
    starts = model.boundaries(text_ids(2, 30))
    assert 2 < int(starts.sum()) < 60  # boundaries were drawn, so the chunk read was exercised
    x = text_ids(1, 30)
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % 256  # the present does change what comes after
    with torch.no_grad():
        a, b = model(x, [0])[0][0, 0], model(y, [0])[0][0, 0]
    assert float((a[:9] - b[:9]).abs().max()) < ROUNDING and not torch.allclose(a[9:], b[9:])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CHUNKINGS)
def test_jacobian_is_lower_triangular(name: str, mode: str) -> None:
    j = jacobian(tiny(CHUNKINGS[name]), 26, mode)
    assert float(j.triu(1).abs().max()) == 0.0
    assert bool((j.diagonal() > 0).all())


def peeking_space_starts(ids: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """A space rule that looks one byte ahead (a chunk opens before a space): a leak."""
    space = chunking._space_table(ids.device)[ids]
    starts = torch.cat([space[:, 1:], torch.zeros_like(space[:, :1])], 1)
    starts[:, 0] = True
    return starts


class PeekingRouter(chunking.Router):
    """A router that compares each state with the *next* one: the typical boundary leak."""

    def forward(self, x: torch.Tensor, prev_key: torch.Tensor | None = None) -> torch.Tensor:
        q, k = torch.nn.functional.normalize(self.q(x, 0)[0], dim=-1), self.keys(x)
        p = (1 - (q[:, 1:-1] * k[:, 2:]).sum(-1)) * 0.5  # unit t against unit t + 1
        ones = p.new_ones(p.shape[0], 1)
        return torch.cat([ones, p, ones], 1).clamp(0, 1)


@pytest.mark.parametrize("mode", MODES)
def test_the_causality_tests_catch_a_boundary_that_peeks_ahead(monkeypatch: pytest.MonkeyPatch,
                                                                mode: str) -> None:
    with monkeypatch.context() as m:
        m.setattr(concept_module, "space_starts", peeking_space_starts)
        assert leak(tiny(CHUNKINGS["space"]), mode) > 1e-3
    with monkeypatch.context() as m:
        m.setattr(concept_module, "Router", PeekingRouter)
        model = tiny(CHUNKINGS["learned"])
        assert leak(model, mode) > 1e-3
        assert float(jacobian(model, 26, mode).triu(1).abs().max()) > 0  # through the straight-through read


@pytest.mark.parametrize("name", CHUNKINGS)
def test_cached_generation_equals_full_recompute(name: str) -> None:
    """Boundaries decided online, one byte at a time, with rows whose chunks close at
    different bytes: the same logits as the full forward, and the same samples."""
    model = tiny(CHUNKINGS[name]).eval()
    x = text_ids(3, 32)
    full = model(x, [0])[0]
    starts = model.boundaries(x)
    assert not torch.equal(starts[0], starts[1])  # the rows advance their tiers at different bytes
    cache = model.new_cache(3)
    cuts = [0, 5, 6, 7, 19, *range(20, 33)]
    parts = [model(x[:, a:b], [0], cache)[0] for a, b in itertools.pairwise(cuts)]
    torch.testing.assert_close(torch.cat(parts, 2), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(x[:, :1], [0], cache)
    prompt = x[0, :7].tolist()  # past the window (sliding): cached and uncached draw the same
    a = list(generate(model, prompt, 40, temperature=1.0, seed=3))
    assert a == list(generate(model, prompt, 40, temperature=1.0, seed=3, use_cache=False))


def test_smoothing_as_one_product_is_the_recurrence() -> None:
    gen = torch.Generator().manual_seed(0)
    added, p = torch.randn(1, 2, 9, 4, generator=gen), torch.rand(2, 9, generator=gen)
    p[:, 0] = 1.0
    before, rows = torch.zeros(2, 4), []
    for j in range(9):
        before = smooth_step(added[0, :, j], before, p[:, j])
        rows.append(before)
    torch.testing.assert_close(smooth(added, p)[0], torch.stack(rows, 1), rtol=1e-5, atol=1e-6)


def test_the_ratio_loss_is_least_at_the_target_chunk_size() -> None:
    model = tiny(CHUNKINGS["learned"])
    n = model.config.concept.chunk_size

    def loss(share: float) -> float:
        starts = torch.rand(4, 1000, generator=torch.Generator().manual_seed(0)) < share
        probs = torch.full((4, 1000), share, requires_grad=True)
        targets = torch.zeros(4, 1000, dtype=torch.long)
        return float(chunking_loss(model, Chunks(starts, probs, None), targets))

    target = loss(1 / n)
    assert target < loss(0.5 / n) and target < loss(2 / n)
    assert math.isclose(target, model.config.concept.chunk_weight, rel_tol=0.05)  # its minimum is 1 * weight


def test_entropy_threshold_tracks_the_target_share_of_starts() -> None:
    model = tiny(CHUNKINGS["entropy"]).train()
    x = text_ids(8, 32)
    for _ in range(60):  # the running quantile of the same batch's entropies settles
        model(x, [0])
    share = float(model.boundaries(x)[:, 1:].float().mean())
    assert abs(share - 1 / model.config.concept.chunk_size) < 0.05
    threshold = model.entropy_threshold.clone()
    with torch.no_grad():  # a forward that computes no gradient (evaluation, sampling) moves nothing
        model(x, [0])
    model.eval()(x, [0])
    assert torch.equal(model.entropy_threshold, threshold)


@pytest.mark.parametrize("name", ["learned", "entropy"])
def test_the_chunkers_train_through_their_own_loss(name: str) -> None:
    model = tiny(CHUNKINGS[name]).train()
    x = text_ids(4, 32)
    y = torch.roll(x, -1, 1)
    if name == "learned":
        loss, _ = training_loss(model, model(x), y)
        loss.backward()
        assert float(model.router.q.weight.grad.abs().sum()) > 0  # ratio loss and straight-through read
        return
    model(x)
    chunking_loss(model, model.last_chunks, y).backward()  # the encoder's next-byte loss alone
    grads = [[p.grad for p in model.blocks[i].parameters()] for i in (0, 1)]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads[0])  # trains the encoder
    assert all(g is None or float(g.abs().sum()) == 0 for g in grads[1])  # and nothing above it


def test_growth_keeps_the_chunks_and_the_logits() -> None:
    model = tiny(CHUNKINGS["learned"]).eval()
    x = text_ids(2, 32)
    grown = grow(model, combo=2).eval()
    assert grown.config.concept.chunking == "learned"
    torch.testing.assert_close(grown(x, [0])[0], model(x, [0])[0], rtol=0, atol=0)


def canary(tmp_path: Path, sets: list[str]) -> float:
    """Validation loss after training on uniform random letters."""
    gen = torch.Generator().manual_seed(5)
    alphabet = "abcdefghijklmnop"
    text = "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (40_000,), generator=gen).tolist())
    (tmp_path / "random.txt").write_text(text)
    cfg = build_config("tiny", None, ["family=concept", "tokenizer=byte", "vocab_size=256",
                                      f"data={tmp_path / 'random.txt'}", "max_steps=150", "lr=0.01",
                                      "sample_tokens=0", "eval_every=150", "ckpt_every=150",
                                      "concept_read_init=1", "concept_read=add", *sets])
    return train(cfg, tmp_path / "run", progress=False).final[0].val_loss


@pytest.mark.slow
@pytest.mark.parametrize("name", ["learned", "entropy"])
def test_leak_canary_random_bytes_stay_at_chance(tmp_path: Path, name: str) -> None:
    assert canary(tmp_path, [f"chunking={name}"]) >= math.log(16) - 0.05


@pytest.mark.slow
def test_cli_trains_and_analyzes_a_learned_chunking(tmp_path: Path, excerpt: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """The README's command at the tiny scale: train, then analyze draws the boundaries."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--preset", "concept-byte", "--quiet",
                           "--set", "chunking=learned",
                           "--set", "max_steps=4", "--set", "eval_every=4", "--set", "ckpt_every=4",
                           "--set", "eval_batches=1", "--set", "sample_tokens=0", "--data", excerpt,
                           "--out", out)
    assert code == 0, err
    code, _, err = run_cli(capsys, "analyze", out, "--windows", "2", "--data", excerpt)
    page = (out / "analysis" / "report.html").read_text()
    assert code == 0 and "Chunks" in page and (out / "analysis" / "chunk_lengths.png").is_file()


@pytest.mark.parametrize("name", ["entropy", "learned"])
@pytest.mark.slow
def test_resume_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    """The entropy threshold is a buffer of the checkpoint and the router a weight: a run
    cut and resumed ends bit for bit where one trained straight through does."""
    assert_resume_is_exact(capsys, tmp_path, *TINY_CONCEPT, "--set", f"chunking={name}", "--set",
                           "concept_read=add", "--max-steps", "6", "--set", "ckpt_every=3")


@pytest.mark.slow
@needs_torchrun
def test_torchrun_two_processes_match_single_process(tmp_path: Path) -> None:
    """The ratio loss and the regression over complete chunks are means over rows, so two
    processes of half the rows each train as one does (to float rounding)."""
    assert_two_processes_match_one(tmp_path, *TINY_CONCEPT, "--set", "chunking=learned", "--set",
                                   "concept_read=add", "--max-steps", "3", rtol=1e-3, atol=1e-4)
