"""Training recipes of nested models: which sub-models train each step, and how the levels'
gradients combine (``sampling``, ``level_probs``, ``level_grads``)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from fractalformer import FractalError
from fractalformer.config import build_config
from fractalformer.models import build_model
from fractalformer.train.losses import level_losses, step_mix, step_weights, training_loss
from fractalformer.train.optim import pcgrad
from fractalformer.train.trainer import surgery

from .conftest import assert_resume_is_exact, run_cli


def cfg(*sets: str):
    return build_config("tiny-fractal", None, list(sets))


def test_level_sampling_draws_one_level_with_its_probabilities() -> None:
    c = cfg("sampling=level", "level_probs=2,1,1")
    subs = c.model.sub_models()
    drawn = []
    for step in range(400):
        levels, w = step_weights(c, step)
        assert len(levels) == 1 and torch.isclose(w.sum(), torch.tensor(1.0))
        assert all((w[i] > 0) == (s[0] == levels[0]) for i, s in enumerate(subs))
        drawn.append(levels[0])
    assert step_weights(c, 7)[0] == step_weights(c, 7)[0]  # a pure function of (seed, step)
    share = drawn.count(0) / len(drawn)
    assert 0.42 < share < 0.58 and drawn.count(1) > 60 and drawn.count(2) > 60


def test_the_sandwich_is_the_full_model_a_smallest_and_one_more() -> None:
    c = cfg("sampling=sandwich")
    subs = c.model.sub_models()
    seen = set()
    for step in range(100):
        levels, w = step_weights(c, step)
        picked = [subs[i] for i in w.nonzero().flatten().tolist()]
        assert len(picked) == 3 and (0, 0) in picked and sum(s[0] == 2 for s in picked) >= 1
        assert torch.allclose(w[w > 0], torch.tensor(1 / 3))
        assert levels == sorted({s[0] for s in picked})
        seen.add(tuple(levels))
    assert seen == {(0, 1, 2), (0, 2)}  # level 1 runs only when drawn


def test_each_step_draws_its_own_mix() -> None:
    c = cfg("mix_weight=0.25")
    m = build_model(c.model)
    mixes = {step_mix(m, c, step) for step in range(40)}
    assert len(mixes) > 5 and step_mix(m, c, 3) == step_mix(m, c, 3)
    assert all(len(mix) == c.model.n_layer for mix in mixes)
    assert step_mix(m, cfg(), 3) is None


def test_all_is_every_sub_model_with_the_model_weights() -> None:
    assert step_weights(cfg(), 3) == (None, None)


def test_pcgrad_projects_conflicting_gradients_only() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    (out,) = pcgrad([[a], [b]], torch.Generator().manual_seed(0))
    # a loses its part along b: a - (a.b / |b|^2) b = (0.5, 0.5); b along a: b + a = (0, 1)
    assert torch.allclose(out, torch.tensor([0.5, 1.5]))
    c = torch.tensor([1.0, 1.0])
    (same,) = pcgrad([[a], [c]], torch.Generator().manual_seed(0))
    assert torch.equal(same, a + c)  # no conflict: the plain sum
    out = pcgrad([[a, None], [b, torch.ones(3)]], torch.Generator().manual_seed(0))
    # whole vectors conflict (a.b = -1, |b|^2 = 5): a gains b / 5, b keeps its own part
    assert torch.allclose(out[1], torch.full((3,), 1.2))
    assert pcgrad([[a, None], [b, None]], torch.Generator().manual_seed(0))[1] is None  # no level reaches it


def test_surgery_on_one_level_is_the_plain_gradient() -> None:
    c = cfg()
    torch.manual_seed(0)
    m = build_model(c.model)
    x = torch.randint(0, c.model.vocab_size, (4, c.model.block_size))
    training_loss(m, m(x, [1]), x)[0].backward()
    want = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    per_level, _ = level_losses(m, m(x, [1]), x, {})
    surgery(m, list(per_level.values()), 1, 0)
    for p, g in zip(m.parameters(), want, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-7)


def test_sub_models_of_levels_that_did_not_run_log_nothing(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "train", "--preset", "tiny-fractal", "--quiet", "--set", "sampling=level",
                           "--set", "sample_tokens=0", "--out", tmp_path / "r")
    assert code == 0, err
    with (tmp_path / "r" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        ran = [lv for lv in range(3) if row[f"train_{lv}.0"]]
        assert len(ran) == 1  # one level a step: the others' cells are empty
    assert len({tuple(bool(row[f"train_{lv}.0"]) for lv in range(3)) for row in rows}) > 1
    assert (tmp_path / "r" / "curves.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [["sampling=sandwich", "distill=0.5"], ["level_grads=pcgrad"],
                                    ["mix_weight=0.25"]])
def test_a_recipe_resumes_exactly(tmp_path: Path, capsys, recipe: list[str]) -> None:
    sets = [a for r in recipe for a in ("--set", r)]
    assert_resume_is_exact(capsys, tmp_path, "--preset", "tiny-fractal", "--quiet", "--max-steps", "6",
                           "--set", "ckpt_every=3", "--set", "sample_tokens=0", *sets)


@pytest.mark.parametrize(("sets", "message"), [
    (["sampling=level"], "nested model"),
    (["level_grads=pcgrad"], "nested model"),
    (["sampling=level", "level_probs=1,1"], "3 non-negative numbers"),
    (["level_probs=1,1,1"], "only with sampling=level"),
    (["family=mrl", "sampling=level"], "family=mrl"),
    (["mix_weight=1.5"], "mix_weight must lie"),
    (["mix_weight=0.5", "residual=upstream"], "without cross-level residuals"),
    (["mix_weight=0.5", "level_grads=pcgrad"], "pcgrad"),
])
def test_bad_recipes_are_config_errors(sets: list[str], message: str) -> None:
    preset = "tiny" if message == "nested model" else "tiny-fractal"  # tiny: the dense model
    with pytest.raises(FractalError, match=message):
        build_config(preset, None, sets).validate()
