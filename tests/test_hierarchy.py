from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from fractalformer import FractalError, get_tokenizer
from fractalformer.config import ModelConfig
from fractalformer.data.corpus import read_text
from fractalformer.hierarchy import (
    cluster,
    groups_to_labels,
    labels_to_groups,
    load_groups,
    seed_groups,
    target_matrix,
)
from fractalformer.models import build_model
from fractalformer.train.losses import group_targets, training_loss

from .conftest import run_cli


def test_group_loss_is_cross_entropy_for_singleton_groups_and_spreads_otherwise() -> None:
    torch.manual_seed(0)
    m = build_model(ModelConfig.of(family="mrl", levels=3, vocab_size=20, block_size=8, n_layer=1, d_model=16,
                                n_head=2, head_dim=8))
    x, y = torch.randint(0, 20, (3, 8)), torch.randint(0, 20, (3, 8))
    _, plain = training_loss(m, m(x), y)
    groups = group_targets(m, {8: [], 4: [[i] for i in range(20)]})  # no groups / all singletons
    _, same = training_loss(m, m(x), y, groups)
    torch.testing.assert_close(same, plain)
    groups = group_targets(m, {4: [[0, 1, 2, 3]]})
    _, grouped = training_loss(m, m(x), y, groups)
    assert grouped[2] != plain[2] and torch.equal(grouped[:2], plain[:2])  # only width 4 changes
    logp = F.log_softmax(m(x, [0])[2][0].float(), -1)
    y_flat, lp = y.flatten(), logp.flatten(0, 1)
    manual = torch.where(y_flat < 4, -lp[:, :4].mean(-1), -lp.gather(1, y_flat[:, None]).squeeze(1)).mean()
    torch.testing.assert_close(grouped[2], manual)


def test_fractal_siblings_get_their_own_groups() -> None:
    """Siblings of a FractalFormer level own different embedding columns: each is
    clustered on its own columns and trained on its own groups."""
    from fractalformer.hierarchy import recluster

    torch.manual_seed(0)
    m = build_model(ModelConfig.of(family="fractal", levels=2, vocab_size=20, block_size=8, n_layer=1,
                                d_model=16, n_head=2, head_dim=8))
    with torch.no_grad():  # sibling 0's columns: tokens 0-9 alike; sibling 1's: 10-19 alike
        m.embed.weight.normal_()
        m.embed.weight[:10, :8] = m.embed.weight[0, :8] + 0.01 * torch.randn(10, 8)
        m.embed.weight[10:, 8:] = m.embed.weight[10, 8:] + 0.01 * torch.randn(10, 8)
    found = recluster(m, "dbscan", 0.1, 3)
    assert set(found) == {"8.0", "8.1"}
    assert found["8.0"] == [list(range(10))] and found["8.1"] == [list(range(10, 20))]
    x, y = torch.randint(0, 20, (3, 8)), torch.randint(0, 20, (3, 8))
    _, plain = training_loss(m, m(x), y)
    groups = group_targets(m, {"8.1": [[0, 1, 2, 3]]})
    _, grouped = training_loss(m, m(x), y, groups)
    assert torch.equal(grouped[:2], plain[:2]) and grouped[2] != plain[2]  # sibling 1 alone changes


def test_target_matrix_rows_are_distributions() -> None:
    m = target_matrix([[0, 2], [1, 3, 4]], 6)
    torch.testing.assert_close(m.sum(1), torch.ones(6))
    assert m[0, 2] == 0.5 and m[3, 1] == pytest.approx(1 / 3) and m[5, 5] == 1


@pytest.mark.parametrize("method", ["dbscan", "agglomerative"])
def test_clustering_recovers_planted_groups(method: str) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    planted = np.repeat(np.arange(4), 6)
    x = centres[planted] + 0.02 * rng.normal(size=(24, 16))
    x = np.vstack([x, rng.normal(size=(3, 16))])  # three loners
    labels = cluster(x, method, eps=0.1, min_samples=3)
    assert adjusted_rand_score(planted, labels[:24]) == 1.0
    assert (labels[24:] == -1).all()
    groups = labels_to_groups(labels)
    assert sorted(len(g) for g in groups) == [6, 6, 6, 6]
    assert adjusted_rand_score(groups_to_labels(groups, 27), np.r_[planted, 10, 11, 12]) == 1.0


def test_seed_groups_for_char_and_bpe128() -> None:
    char = get_tokenizer("char", read_text(None))
    g = seed_groups(char, [2, 4, 8, 16, 32])
    assert len(g[2]) == 2 and sum(map(len, g[2])) == 65
    assert len(g[4]) == 4 and len(g[8]) == 3 and len(g[16]) == 26 and 32 not in g
    strings = [char.decode([i]) for i in range(65)]
    assert sorted(strings[i] for i in next(p for p in g[16] if "a" in [strings[i] for i in p])) == ["A", "a"]
    bpe = get_tokenizer("bpe128")
    gb = seed_groups(bpe, [32, 64, 128])
    assert len(gb[32]) == 2 and sum(map(len, gb[32])) == 128  # symbols vs letters, merges included


def test_groups_file_errors(tmp_path: Path) -> None:
    tok = get_tokenizer("bpe128")
    f = tmp_path / "g.json"
    f.write_text(json.dumps({"sizes": {"4": [["a", "é"]]}}))
    with pytest.raises(FractalError, match="'é' is not in the bpe128 vocabulary"):
        load_groups(str(f), tok)
    f.write_text(json.dumps({"sizes": {"4": [["a", "b"], ["b", "c"]]}}))
    with pytest.raises(FractalError, match="in two groups"):
        load_groups(str(f), tok)
    f.write_text("[1, 2]")
    with pytest.raises(FractalError, match="'sizes'"):
        load_groups(str(f), tok)
    assert load_groups(str(Path(__file__).parents[1] / "fractalformer/assets/groups_bpe128.json"), tok)


@pytest.mark.slow
def test_imposed_and_emergent_run_and_the_report(capsys, excerpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "mrl"
    code, _, err = run_cli(capsys, "train", "--preset", "tiny", "--quiet", "--tokenizer", "char", "--set",
                           "family=mrl", "--set", "levels=4", "--set", "groups=seed", "--set",
                           "emergent_every=5", "--set", "sample_tokens=0", "--max-steps", "12", "--out", out)
    assert code == 0, err
    history = json.loads((out / "clusters.json").read_text())
    assert [c["step"] for c in history] == [5, 10] and set(history[0]["sizes"]) == {"4", "8", "16"}
    assert json.loads((out / "groups.json").read_text())["sizes"]["4"]
    code, _, err = run_cli(capsys, "analyze", out, "--windows", "4", "--data", excerpt)
    assert code == 0, err
    html = (out / "analysis" / "report.html").read_text()
    assert html.count("data:image/png;base64") == 6 and "expected acceptance" in html  # curves, 4 maps, tree
    summary = json.loads((out / "analysis" / "summary.json").read_text())
    assert set(summary["cosines"]) == {"a,A", "a,i"}
    assert set(summary["cosines"]["a,A"]) == {"32", "16", "8", "4"}
    assert set(summary["emergent_ari"]) <= {"4", "8", "16"}
    assert summary["consistency"]["0.0"]["top1_agreement"] == 1.0
    # the full-width model extracts to a plain dense run that loads and samples
    code, _, err = run_cli(capsys, "extract", out, "--level", "0", "--index", "0", "--out", tmp_path / "x")
    assert code == 0, err
    code, _, err = run_cli(capsys, "sample", tmp_path / "x", "--max-new-tokens", "5")
    assert code == 0, err
    # resuming re-installs the last emergent groups: same losses as the uninterrupted run
    part = tmp_path / "part"
    args = ["train", "--preset", "tiny", "--quiet", "--tokenizer", "char", "--set", "family=mrl", "--set",
            "levels=4", "--set", "groups=seed", "--set", "emergent_every=5", "--set", "sample_tokens=0",
            "--max-steps", "12"]
    assert run_cli(capsys, *args, "--out", part, "--stop-after", "7")[0] == 0
    assert run_cli(capsys, "train", "--out", part, "--resume", "--quiet")[0] == 0
    col = [line.split(",")[3] for line in (out / "metrics.csv").read_text().splitlines()]
    assert col == [line.split(",")[3] for line in (part / "metrics.csv").read_text().splitlines()]


def test_groups_need_a_nested_model(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "train", "--preset", "tiny", "--set", "groups=seed", "--out",
                           tmp_path / "x")
    assert code == 2 and "need a nested model" in err


@pytest.mark.parametrize("fixture", ["tiny_run", "fractal_run"])
@pytest.mark.slow
def test_report_builds_for_dense_and_fractal_runs(capsys, request, fixture: str, excerpt: Path,
                                                   tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(request.getfixturevalue(fixture), run)
    code, _, err = run_cli(capsys, "analyze", run, "--windows", "2", "--data", excerpt)
    assert code == 0, err
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    n_sub = 1 if fixture == "tiny_run" else 7
    assert len(summary["consistency"]) == n_sub and "0.0" in summary["consistency"]
    assert (run / "analysis" / "report.html").stat().st_size > 10_000
