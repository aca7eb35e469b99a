"""`fractalformer analyze`: report.html is a page a person reads - checked in a real headless browser."""

from __future__ import annotations

from pathlib import Path

import pytest

from fractalformer.analysis.report import token_labels
from fractalformer.tokenizers import get_tokenizer

from .conftest import chromium, run_cli

SECTIONS = ["The run", "Sub-models", "Samples", "Loss curves", "Embedding similarity per width",
            "Clusters of the embedding"]


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
        assert script("return document.images.length") == 5  # curves, a heatmap per level, dendrogram
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
