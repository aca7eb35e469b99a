from __future__ import annotations

import pytest
import torch

from fractalformer import FractalError
from fractalformer.nn import Nesting


@pytest.mark.parametrize("split,levels", [(2, 3), (3, 3), (2, 4)])
@pytest.mark.parametrize("groups", [1, 4])
def test_blocks_nest_inside_their_parents_and_tile_the_dimension(
    split: int, levels: int, groups: int
) -> None:
    nest = Nesting("block", levels, split)
    full = groups * split ** (levels - 1) * 2
    for lv in range(levels):
        owned = nest.owned(full, lv, groups)
        assert owned.shape == (split**lv, full // split**lv)
        assert sorted(owned.flatten().tolist()) == list(range(full))  # disjoint, covering
        for j in range(split**lv):
            if lv:
                pl, pj = nest.parent(lv, j)
                assert set(owned[j].tolist()) <= set(nest.owned(full, pl, groups)[pj].tolist())
            if groups > 1:  # nesting happens inside every group (head)
                g = full // groups
                per_group = owned[j].view(groups, -1)
                assert all(((row >= k * g) & (row < (k + 1) * g)).all() for k, row in enumerate(per_group))


def test_a_prefix_is_block_zero() -> None:
    block, prefix = Nesting("block", 3, 2), Nesting("prefix", 3, 2)
    for lv in range(3):
        assert prefix.count(lv) == 1
        assert torch.equal(prefix.owned(64, lv)[0], torch.arange(64 // 2**lv))
        assert torch.equal(prefix.owned(64, lv)[0], block.owned(64, lv)[0])
        assert torch.equal(prefix.owned(64, lv, groups=4)[0], block.owned(64, lv, groups=4)[0])


def test_take_stacks_each_sub_models_block() -> None:
    nest = Nesting("block", 3, 2)
    w = torch.arange(8 * 12.0).view(8, 12)
    got = nest.take(w, 2, (1, 1))
    assert got.shape == (4, 2, 3)
    for j in range(4):
        assert torch.equal(got[j], w[2 * j : 2 * j + 2, 3 * j : 3 * j + 3])
    rows = nest.take(w, 1, (0, 2))  # columns in 2 groups, rows not nested
    assert torch.equal(rows[1], torch.cat([w[:, 3:6], w[:, 9:12]], 1))
    assert torch.equal(nest.take(w, 0, (1, 1))[0], w)


def test_out_of_range_and_bad_nestings() -> None:
    nest = Nesting("block", 3, 2)
    with pytest.raises(FractalError, match="level 3 is out of range"):
        nest.check(3)
    with pytest.raises(FractalError, match="index 4 is out of range"):
        nest.check(2, 4)
    with pytest.raises(FractalError, match="split"):
        Nesting("block", 2, 1)
    with pytest.raises(FractalError, match="kind"):
        Nesting("diagonal", 2, 2)


def test_unequal_segments_nest_separately() -> None:
    nest = Nesting("block", 2, 2)
    owned = nest.owned(8, 1, (4, 2, 2))  # e.g. fused q (4), k (2), v (2)
    assert owned.tolist() == [[0, 1, 4, 6], [2, 3, 5, 7]]
    with pytest.raises(FractalError, match="does not nest"):
        nest.owned(9, 1, (4, 3, 2))


def test_weight_slices_follow_writes_through_data() -> None:
    """Writes through ``p.data`` (EMA, weight surgery) do not move the version counter; the
    slices a generation or evaluation reuses must still reflect them."""
    from fractalformer.config import build_config
    from fractalformer.evaluate import mean_losses
    from fractalformer.generate import generate, speculate
    from fractalformer.models import build_model

    cfg = build_config("tiny-fractal", None, ["vocab_size=40"]).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    fresh = build_model(cfg).eval()
    x = torch.randint(0, 40, (2, 16))
    batches = [(x, x.roll(1, 1))]

    def outputs(m: torch.nn.Module) -> tuple:
        return (list(generate(m, [1, 2, 3], 12, temperature=0, level=2, index=1)),
                list(speculate(m, [1, 2, 3], 12, drafts=[(2, 0)], gamma=3, target=(1, 0), adaptive=False)),
                mean_losses(m, batches)[0])

    before = outputs(model)
    with torch.no_grad():
        for p in model.parameters():
            p.data.copy_(torch.randn_like(p) * 0.5)
    fresh.load_state_dict(model.state_dict())
    after, expected = outputs(model), outputs(fresh)
    assert after == expected
    assert after[2] != before[2]  # the write did change what the model computes
