"""`fractalformer analyze`: report.html is a page a person reads - checked in a real headless browser."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fractalformer import FractalError
from fractalformer.analysis.report import _trained_steps, emergent_ari, token_labels
from fractalformer.config import build_config
from fractalformer.data.tokenizers import get_tokenizer
from fractalformer.models import build_model
from fractalformer.train.curves import plot_curves, read_metrics

from .conftest import chromium, run_cli

SECTIONS = ["The run", "Sub-models", "Samples", "Loss curves", "Mix'n'Match",
            "Embedding similarity per width", "Clusters of the embedding"]


def test_token_labels_are_printable() -> None:
    for name in ("bpe128", "byte"):
        labels = token_labels(get_tokenizer(name))
        assert all(label and label.isprintable() and "\ufffd" not in label for label in labels), name
    byte = token_labels(get_tokenizer("byte"))
    assert (byte[10], byte[32], byte[65], byte[200]) == ("↵", "␣", "A", "xc8")


@pytest.mark.slow
def test_report_renders_in_a_browser(capsys, excerpt: Path, tmp_path: Path) -> None:
    text = excerpt  # a short text keeps the full validation pass quick
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--preset", "tiny-fractal", "--quiet", "--data", text, "--max-steps",
                   "10", "--set", "sample_tokens=0", "--out", run)[0] == 0
    code, _, err = run_cli(capsys, "analyze", run, "--windows", "2")
    assert code == 0, err
    report = run / "analysis" / "report.html"
    browser = chromium(tmp_path / "profile")
    try:
        browser.get(report.as_uri())
        script = browser.execute_script
        assert script("return document.readyState") == "complete"
        assert script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert script("return document.images.length") == 6  # curves, mixes, a heatmap per level, dendrogram
        assert script("return document.documentElement.scrollWidth <= window.innerWidth")  # no side scroll
        h2 = script("return [...document.querySelectorAll('h2')].map(h => h.textContent)")
        assert h2 == SECTIONS
        explained = script("return [...document.querySelectorAll('h2 + p.about')].map(p => p.textContent)")
        assert len(explained) == len(SECTIONS) - 1 and all(len(p) > 40 for p in explained)
        headers = script("return [...document.querySelectorAll('th')].map(t => t.textContent)")
        assert "top-1 agreement" in headers and not [h for h in headers if "_" in h]
        assert script("return document.querySelectorAll('pre').length") == 7  # a sample per sub-model
        assert "generated" in script("return document.querySelector('.meta').textContent")
        png = tmp_path / "report.png"
        assert browser.save_screenshot(str(png)) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        browser.quit()


@pytest.mark.parametrize(("content", "msg"), [
    (b"\xff\xfe garbage", "cannot be read as a metrics table"),
    (b"", "its header has no step and train_loss"), (b"a,b\n1,2\n", "its header has no step"),
    (b"step,train_loss\n1,0.5\nx,0.4\n", "line 3"), (b"step,train_loss,val_loss\n1,0.5,high\n", "line 2"),
    (b"step,train_loss\n1,0.5,7,8\n", "2 values too many"),
])
def test_metrics_that_are_no_table_are_one_line(tmp_path: Path, content: bytes, msg: str) -> None:
    (tmp_path / "metrics.csv").write_bytes(content)
    with pytest.raises(FractalError, match=msg):
        plot_curves(tmp_path)


def test_metrics_with_a_row_cut_short_still_plot(tmp_path: Path) -> None:
    rows = ["step,tokens,lr,train_loss,val_loss", "1,8,0.1,4.2,4.3", "2,16,0.1,4.1"]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    header, rows = read_metrics(tmp_path / "metrics.csv")
    assert header[-1] == "val_loss" and rows[-1]["val_loss"] is None
    assert plot_curves(tmp_path).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_report_of_any_run_folder_leaves_out_what_it_has_no_data_for(capsys, excerpt: Path,
                                                                      tmp_path: Path) -> None:
    run, part = tmp_path / "run", tmp_path / "part"
    assert run_cli(capsys, "train", "--preset", "tiny", "--quiet", "--data", excerpt, "--max-steps", "2",
                   "--set", "sample_tokens=0", "--out", run)[0] == 0
    assert run_cli(capsys, "extract", run, "--level", "0", "--index", "0", "--out", part)[0] == 0
    assert not (part / "metrics.csv").exists()
    code, _, err = run_cli(capsys, "analyze", part, "--windows", "2")
    assert code == 0, err
    page = (part / "analysis" / "report.html").read_text()
    assert "Sub-models" in page and "Loss curves" not in page
    (run / "metrics.csv").write_text("no,table\n")
    with pytest.warns(UserWarning, match=r"metrics.csv is not a metrics table.*leaves out the loss curves"):
        code, _, err = run_cli(capsys, "analyze", run, "--windows", "2")
    assert code == 0 and "Loss curves" not in (run / "analysis" / "report.html").read_text()
    shutil.rmtree(run / "analysis")
    (run / "analysis").write_text("my notes")
    code, _, err = run_cli(capsys, "analyze", run, "--windows", "2")
    assert code == 2 and "is a file, not a folder" in err and len(err.splitlines()) == 1
    assert (run / "analysis").read_text() == "my notes"


def test_clusterings_and_train_state_that_are_garbage_are_left_out(tmp_path: Path) -> None:
    model = build_model(build_config("tiny-fractal").model)
    for content in (b"\xff", b"[]", b'[{"ids": {"x": 1}}]', b'{"ids": 3}'):
        (tmp_path / "clusters.json").write_bytes(content)
        with pytest.warns(UserWarning, match="clusters.json cannot be read as a clustering history"):
            assert emergent_ari(tmp_path, model, get_tokenizer("bpe128")) == {}
    state = tmp_path / "train_state.json"
    for content, step in ((b'{"step": 12}', 12), (b"[1]", None), (b'{"step": "12"}', None), (b"\xff", None)):
        state.write_bytes(content)
        assert _trained_steps(state) == step
    assert _trained_steps(tmp_path / "absent.json") is None
