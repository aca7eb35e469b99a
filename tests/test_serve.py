"""`fractalformer serve`: batched decoding equals solo decoding, the HTTP API (SSE format,
bad requests, a full queue, clients that go away, the Host / Content-Type / API key guard,
the sliding window, chat completions), the CLI's errors and URL, and the page in a real
headless browser."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

import fractalformer
from fractalformer.checkpoint import MODEL, save_tensors
from fractalformer.cli import main
from fractalformer.config import build_config
from fractalformer.data.tokenizers import get_tokenizer
from fractalformer.errors import FractalError
from fractalformer.generate import generate, probabilities, sample_next
from fractalformer.generate.speculative import parse_sub_model
from fractalformer.loading import TrainedModel
from fractalformer.models import build_model
from fractalformer.runs import prepare_data, save_run_config
from fractalformer.serve import Batcher, Job, Limits, create_app, model_cards
from fractalformer.serve import app as serve_app
from fractalformer.serve.app import allowed_hosts, chat_prompt
from fractalformer.serve.batcher import Finished, Token

from .conftest import chromium, run_cli


@pytest.fixture(scope="module")
def random_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny FractalFormer (1 + 2 + 4 sub-models, context 64) with large weights,
    so that every sub-model's greedy text varies from token to token."""
    out = tmp_path_factory.mktemp("serve") / "random"
    cfg = build_config("tiny-fractal", None, ["block_size=64", "init_std=0.3"])
    torch.manual_seed(0)
    save_run_config(out, cfg, get_tokenizer("bpe128"))
    save_tensors(out / MODEL, dict(build_model(cfg.model).state_dict()), {"step": "0"})  # weights alone
    return out


@pytest.fixture(scope="module")
def trained(random_run: Path) -> TrainedModel:
    return fractalformer.load(random_run)


@pytest.fixture(scope="module")
def model(trained: TrainedModel) -> torch.nn.Module:
    return trained.model


def collect(batcher: Batcher, jobs: list[Job]) -> dict[int, list]:
    """Submit ``jobs`` (their ``emit`` is replaced) and return each one's events by position."""
    events: dict[int, list] = {i: [] for i in range(len(jobs))}
    for i, job in enumerate(jobs):
        job.emit = events[i].append
        batcher.submit(job)
    return events


def tokens(evs: list) -> list[int]:
    assert isinstance(evs[-1], Finished), evs[-1]
    return [e.id for e in evs if isinstance(e, Token)]


PROMPTS = ["ROMEO:", "O", "First Citizen:\nBefore we", "To be, or not"]
TARGETS = [(0, 0), (1, 1), (2, 3), (1, "ensemble"), (2, "ensemble")]


def test_batched_greedy_equals_solo_greedy(model: torch.nn.Module, trained) -> None:
    """Every request queued first, so the first step admits them all into shared batches;
    prompts of different lengths put the rows at different positions."""
    tok = trained.tokenizer
    jobs = [Job(tok.encode(p), 24, t, print, temperature=0.0) for t in TARGETS for p in PROMPTS]
    batcher = Batcher(model, max_batch=len(jobs), queue_size=len(jobs))
    events = collect(batcher, jobs)
    while batcher.step():
        pass
    # each group (one per model and levels: here one per target) decoded its requests in one forward
    assert batcher.counts["peak_batch"] == len(PROMPTS)
    texts = set()
    for i, job in enumerate(jobs):
        level, index = job.target
        solo = list(generate(model, job.prompt, 24, 0.0, level=level, index=index))
        assert tokens(events[i]) == solo, (job.target, i)
        texts.add(tuple(solo))
    assert len(texts) > len(jobs) // 2  # the outputs differ: equality is not trivial


def test_requests_joining_and_leaving_mid_decoding_stay_exact(model: torch.nn.Module, trained) -> None:
    """Requests arrive while others decode and finish at different lengths, so the batch is
    regathered with old and new rows; seeded sampling is per request, as when alone."""
    tok = trained.tokenizer
    batcher = Batcher(model, max_batch=3, queue_size=16)  # the rest wait in the queue
    specs = [(p, n, t) for p, n, t in zip(PROMPTS * 2, [5, 30, 12, 20, 9, 17, 25, 3], [0.0, 1.0] * 4,
                                          strict=True)]
    jobs = [Job(tok.encode(p), n, (0, 0), print, temperature=t, seed=7 + i)
            for i, (p, n, t) in enumerate(specs[:4])]
    events = collect(batcher, jobs)
    for _ in range(4):
        batcher.step()
    late = [Job(tok.encode(p), n, (1, 0), print, temperature=t, seed=20 + i)
            for i, (p, n, t) in enumerate(specs[4:])]
    late_events = collect(batcher, late)
    while batcher.step():
        pass
    assert batcher.counts["peak_batch"] == 3 and batcher.counts["completed"] == 8
    for job, evs in [*zip(jobs, events.values(), strict=True), *zip(late, late_events.values(), strict=True)]:
        level, index = job.target
        solo = generate(model, job.prompt, job.max_tokens, job.temperature, seed=job.seed, level=level,
                        index=index)
        assert tokens(evs) == list(solo)


def test_per_row_cache_positions_match_one_cache_per_row(model: torch.nn.Module) -> None:
    """The attention primitive: rows at positions 3 and 7 of one cache give the logits of
    two separate caches (to float rounding)."""
    seqs = [[5, 9, 2, 4], [1, 2, 3, 4, 5, 6, 7, 8]]
    solo = []
    for s in seqs:
        caches = model.new_cache(1, [1])
        model(torch.tensor([s[:-1]]), [1], caches)
        solo.append(model(torch.tensor([s[-1:]]), [1], caches)[1][:, 0, -1])
    batched = model.new_cache(2, [1])
    for b, s in enumerate(seqs):  # fill row b of both sub-models from its own prefill
        caches = model.new_cache(1, [1])
        model(torch.tensor([s[:-1]]), [1], caches)
        for mine, theirs in ((batched[1].k, caches[1].k), (batched[1].v, caches[1].v)):
            mine.unflatten(1, (2, 2))[:, :, b] = theirs
    batched[1].length = torch.tensor([len(s) - 1 for s in seqs]).repeat(2)
    out = model(torch.tensor([[s[-1]] for s in seqs]), [1], batched)[1][:, :, -1]
    for b in range(2):
        torch.testing.assert_close(out[:, b], solo[b], rtol=1e-5, atol=1e-5)
    assert batched[1].length.tolist() == [4, 8, 4, 8]


# -- the HTTP API on a live server (uvicorn in a thread, loopback only) -----------------------------
@contextmanager
def live(trained: TrainedModel, run: Path, batcher: Batcher, limits: Limits | None = None) -> Iterator[str]:
    app = create_app(trained, batcher, run.name, limits or Limits(), model_cards(trained, run))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            threading.Event().wait(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def api(trained: TrainedModel, random_run: Path) -> Iterator[tuple[httpx.Client, Batcher]]:
    batcher = Batcher(trained.model, max_batch=8, queue_size=8)
    batcher.start()
    with live(trained, random_run, batcher, Limits(max_tokens=40, max_prompt_chars=100)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        yield client, batcher
    batcher.stop()


def sse(client: httpx.Client, body: dict) -> list[str]:
    """The ``data:`` payloads of a streamed completion, checking the event framing."""
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.replace("\r\n", "\n").split("\n\n") if e and not e.startswith(":")]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw[:300]
    return [e[6:] for e in events]


def test_stream_is_openai_sse_and_matches_the_plain_answer(api, model, trained) -> None:
    client, _ = api
    body = {"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0, "sub_model": "2:1"}
    data = sse(client, body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 12 + ["length"]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    n = len(trained.tokenizer.encode("ROMEO:"))
    assert chunks[-1]["usage"] == {"prompt_tokens": n, "completion_tokens": 12, "total_tokens": 12 + n}
    plain = client.post("/v1/completions", json=body).json()
    assert plain["model"] == chunks[0]["model"] == "2:1"
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert [c["choices"][0]["token"] for c in chunks[:-1]] == plain["choices"][0]["tokens"] == \
        list(generate(model, trained.tokenizer.encode("ROMEO:"), 12, 0.0, level=2, index=1))


def test_speculative_marks_accepted_drafts_and_is_exact(api, model, trained) -> None:
    client, _ = api
    body = {"prompt": "To be", "max_tokens": 30, "temperature": 0,
            "speculate": {"drafts": ["1:0", "2:1"], "gamma": 3, "adaptive": False}}
    out = client.post("/v1/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["tokens"] == list(generate(model, trained.tokenizer.encode("To be"), 30, 0.0))
    spec = out["stats"]["speculative"]
    assert sum(choice["drafted"]) == spec["accepted"] > 0  # (not adaptive: it drafts every round)
    chunks = [json.loads(d) for d in sse(client, body)[:-1]]
    assert all(isinstance(c["choices"][0]["drafted"], bool) for c in chunks[:-1])


def test_models_and_health(api, model) -> None:
    client, _ = api
    models = client.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert ids == ["0:0", "1:0", "1:1", "1:ensemble", "2:0", "2:1", "2:2", "2:3", "2:ensemble"]
    widths = {m["id"]: (m["width"], m["params"]) for m in models["data"]}
    assert widths["0:0"] == (32, model.num_params()) and widths["2:3"][0] == 8
    assert widths["2:ensemble"][1] == 4 * widths["2:0"][1]
    assert models["context"] == 64 and models["limits"]["max_tokens"] == 40
    until(lambda: client.get("/health").json()["active"] == 0)  # earlier tests' requests are done
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["limits"]["max_batch"] == health["limits"]["queue_size"] == 8


def test_models_report_the_runs_last_validation(tmp_path: Path) -> None:
    run = tmp_path / "run"  # stopped after step 1 of 2: validated at step 1, no final evaluation
    assert main(["train", "--preset", "tiny-fractal", "--quiet", "--max-steps", "2", "--stop-after", "1",
                 "--set", "eval_every=1", "--set", "sample_tokens=0", "--out", str(run)]) == 0
    cards = {c["id"]: c for c in model_cards(fractalformer.load(run), run)}
    assert set(cards) == {"0:0", "1:0", "1:1", "1:ensemble", "2:0", "2:1", "2:2", "2:3", "2:ensemble"}
    with (run / "metrics.csv").open() as f:
        row = next(csv.DictReader(f))
    assert cards["0:0"]["val_loss"] == round(float(row["val_loss"]), 4)
    assert cards["2:3"]["val_loss"] == round(float(row["val_2.3"]), 4)
    assert cards["1:ensemble"]["val_loss"] == round(float(row["val_1.ens"]), 4)
    assert cards["0:0"]["val_bpc"] == round(float(row["val_bpc"]), 4)
    assert all(c["val_step"] == 1 and 0 < c["val_bpc"] < 10 for c in cards.values())



def test_models_read_characters_per_token_from_the_run_not_the_text(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"  # training records its validation text's characters per token
    assert main(["train", "--preset", "tiny-fractal", "--quiet", "--max-steps", "2", "--set", "eval_every=1",
                 "--set", "sample_tokens=0", "--set", "final_eval=0", "--out", str(run)]) == 0
    trained = fractalformer.load(run)
    units = json.loads((run / "config.json").read_text())["val_units_per_token"]
    assert units == prepare_data(trained.run_config, trained.tokenizer)[1].val_units_per_token
    monkeypatch.setattr(serve_app, "prepare_data", lambda *a, **k: pytest.fail("re-tokenised the text"))
    cards = {c["id"]: c for c in model_cards(trained, run)}
    with (run / "metrics.csv").open() as f:
        row = list(csv.DictReader(f))[-1]
    assert cards["0:0"]["val_bpc"] == round(float(row["val_bpc"]), 4)


BAD = [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"max_tokens": 4}, 400, "prompt", "Field required"),
    ({"prompt": "x", "sub_model": "7:0"}, 404, "sub_model", "out of range"),
    ({"prompt": "x", "sub_model": "1:2"}, 404, "sub_model", "out of range"),
    ({"prompt": "x", "model": "1:1", "sub_model": "2:1"}, 400, "model", "differ"),
    ({"prompt": "x", "sub_model": "zero"}, 400, "sub_model", "LEVEL:INDEX"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "x", "max_tokens": 41}, 400, "max_tokens", "at most 40"),
    ({"prompt": "x" * 101}, 400, "prompt", "at most 100"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature", "greater than or equal to 0"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed", "less than 9223372036854775808"),
    ({"prompt": "x", "sub_model": "\u00b2:ensemble"}, 400, "sub_model", "LEVEL:INDEX"),
    ({"prompt": "x", "sub_model": "9" * 4000 + ":0"}, 400, "sub_model", "LEVEL:INDEX"),
    ({"prompt": "x", "n": 2}, 400, "n", "unknown field"),
    ({"prompt": ["x", "y"]}, 400, "prompt", "valid string"),
    ({"prompt": "caf\u00e9"}, 400, "prompt", "U+00E9"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": "x", "speculate": {"drafts": ["0:0"]}}, 400, "speculate", "deeper level"),
    ({"prompt": "x", "speculate": {"drafts": []}}, 400, "speculate.drafts", "at least 1"),
    ({"prompt": "x", "speculate": {"drafts": ["2:0"], "gamma": 0}}, 400, "speculate.gamma", "greater than"),
    ({"prompt": "x", "ensemble": True, "speculate": {"drafts": ["2:0"]}}, 400, "speculate", "ensemble"),
]


@pytest.mark.parametrize("body,status,param,match", BAD)
@pytest.mark.slow
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(api, body, status, param, match) -> None:
    client, _ = api
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    for stream in (False, True):  # a streamed request is refused before its stream starts
        if isinstance(body, dict):
            content = json.dumps({**body, "stream": stream}).encode()
        r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == status and r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert match in err["message"] and err["param"] == param, err
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_oversized_body_and_unknown_routes(api) -> None:
    client, _ = api
    r = client.post("/v1/completions", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    assert client.get("/v1/nothing").status_code == 404 and "error" in client.get("/v1/nothing").json()
    assert client.get("/v1/completions").status_code == 405


def until(cond, seconds: float = 20.0) -> None:
    """Wait (bounded) for a condition another thread brings about."""
    done = threading.Event()
    for _ in range(int(seconds / 0.02)):
        if cond():
            return
        done.wait(0.02)
    raise AssertionError("condition not reached")


def test_full_queue_answers_503_until_there_is_room(model, random_run, trained) -> None:
    batcher = Batcher(model, max_batch=1, queue_size=1)
    held, release = threading.Event(), threading.Event()

    def hold(ev: object) -> None:  # the scheduler thread stops inside this job's first token
        if not held.is_set():
            held.set()
            assert release.wait(20)

    batcher.start()
    try:
        with live(trained, random_run, batcher) as base, httpx.Client(base_url=base, timeout=30) as client:
            batcher.submit(Job(trained.tokenizer.encode("O"), 5, (0, 0), hold))
            assert held.wait(20)
            batcher.submit(Job(trained.tokenizer.encode("O"), 2, (0, 0), lambda ev: None))  # the one place
            r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
            assert r.headers["retry-after"] == "1"
            release.set()
            until(lambda: batcher.status()["completed"] == 2)
            assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
            until(lambda: batcher.status()["active"] == 0)  # counted at the end of the scheduler's step
            status = batcher.status()
            assert status | {"queued": 0, "completed": 3, "failed": 0} == status
    finally:
        batcher.stop()


def test_client_disconnecting_mid_stream_cancels_its_request(model, random_run, trained) -> None:
    """A second job decodes beside the streamed request and holds the scheduler (its token
    callback runs on the scheduler thread) after the stream's first token until the server
    has seen the client go: the request is dropped with most of its 40 tokens unmade."""
    batcher = Batcher(model, max_batch=4, queue_size=4)
    streamed: list[Job] = []
    seen: list[bool] = []

    def emit(ev: object) -> None:
        if seen:
            return
        if not streamed:  # first token: wait for the streamed request to be queued
            until(lambda: batcher.pending.qsize() == 1)
            streamed.append(batcher.pending.queue[0])
        elif batcher.pending.qsize() == 0:  # admitted, its first token is out: wait for the client to go
            seen.append(streamed[0].cancelled.wait(20))

    blocker = Job(trained.tokenizer.encode("O"), 40, (0, 0), emit, temperature=0.0)

    batcher.submit(blocker)
    batcher.start()
    try:
        with live(trained, random_run, batcher) as base, httpx.Client(base_url=base, timeout=30) as client:
            with client.stream("POST", "/v1/completions",
                               json={"prompt": "O", "max_tokens": 40, "stream": True, "temperature": 0}) as r:
                assert next(r.iter_lines()).startswith("data: ")
            until(lambda: batcher.status()["active"] == 0 and batcher.counts["completed"] == 1)
            assert seen == [True]
            assert batcher.counts["cancelled"] == 1 and batcher.counts["completed"] == 1
            assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200
    finally:
        batcher.stop()


# -- the command line -------------------------------------------------------------------------------
def test_serve_cli_errors_are_one_line(capsys, tmp_path: Path, random_run: Path) -> None:
    code, _, err = run_cli(capsys, "serve", tmp_path / "nope")
    assert code == 2 and err.strip() == f"error: run folder not found: {tmp_path / 'nope'}"
    broken = tmp_path / "broken"
    shutil.copytree(random_run, broken)
    (broken / "model.safetensors").write_bytes((random_run / "model.safetensors").read_bytes()[:100])
    code, _, err = run_cli(capsys, "serve", broken)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "corrupt or truncated" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", random_run, "--port", port)
    assert code == 2 and err.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.slow
# -- the page, in headless Chromium -----------------------------------------------------------------
def test_page_streams_a_completion_in_a_browser(api, model, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client, _ = api
    browser = chromium(tmp_path / "profile")
    try:
        browser.get(str(client.base_url))
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert browser.find_element(By.ID, "max_tokens").get_attribute("value") == "40"  # min(128, 64, 40)
        assert "7 sub-models" in browser.find_element(By.ID, "info").text

        def fill(field: str, value: str) -> None:
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)

        def run() -> list:
            browser.find_element(By.ID, "go").click()
            wait.until(lambda b: b.find_element(By.ID, "status").get_attribute("data-state")
                       in ("done", "error"))
            assert browser.find_element(By.ID, "status").text == "done"
            return browser.find_elements(By.CSS_SELECTOR, "#out .tok")

        fill("prompt", "ROMEO:")
        fill("max_tokens", "20")
        fill("temperature", "0")
        spans = run()
        want = client.post("/v1/completions",
                           json={"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0}).json()
        assert len(spans) == 20
        text = "return [...document.querySelectorAll('#out .tok')].map(e => e.textContent).join('')"
        assert browser.execute_script(text) == want["choices"][0]["text"]
        assert "tokens/s" in browser.find_element(By.ID, "figures").text
        browser.find_element(By.CSS_SELECTOR, 'input[name="mode"][value="speculative"]').click()
        spans = run()
        kinds = [s.get_attribute("class") for s in spans]
        assert len(spans) == 20 and set(kinds) <= {"tok drafted", "tok target"}
        assert f"{kinds.count('tok drafted')} of 20 tokens drafted and accepted" in \
            browser.find_element(By.ID, "figures").text
        png = tmp_path / "page.png"
        assert browser.save_screenshot(str(png)) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        browser.quit()


# -- hardening: overflow, parsing, seeds, guards, context, chat -------------------------------------
def test_tiny_temperature_and_top_p_sample_without_overflow(api, model) -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    for t, p in ((1e-300, None), (5e-324, None), (1.0, 1e-46), (1e-30, 1e-46), (0.7, 5e-324)):
        probs = probabilities(logits, t, None, p)
        assert torch.isfinite(probs).all(), (t, p)
        assert int(sample_next(logits, t, None, p)) == 1  # the argmax: greedy, or the only token kept
    client, _ = api
    greedy = client.post("/v1/completions", json={"prompt": "O", "max_tokens": 6, "temperature": 0}).json()
    for extra in ({"temperature": 1e-300}, {"top_p": 1e-46}, {"temperature": 1e-300, "top_p": 1e-46}):
        r = client.post("/v1/completions", json={"prompt": "O", "max_tokens": 6, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["tokens"] == greedy["choices"][0]["tokens"]
    spec = {"drafts": ["2:0"], "gamma": 2}
    r = client.post("/v1/completions", json={"prompt": "O", "max_tokens": 6, "temperature": 1e-300,
                                             "speculate": spec})
    assert r.status_code == 200 and r.json()["choices"][0]["tokens"] == greedy["choices"][0]["tokens"]


@pytest.mark.parametrize("spec", ["\u00b2:ensemble", "1:\u00b2", "\u0661:0", "9" * 5000 + ":0", "01:0",
                                  " 1:0", "1:0 ", "1:+0", "1:ensemble:0", "1", ":0", "-1:0"])
def test_sub_model_specs_are_parsed_strictly(model, spec: str) -> None:
    with pytest.raises(FractalError, match="LEVEL:INDEX") as e:
        parse_sub_model(spec, model, ensemble=True)
    assert len(str(e.value)) < 200
    assert parse_sub_model("2:ensemble", model, ensemble=True) == (2, "ensemble")
    with pytest.raises(FractalError, match="LEVEL:INDEX"):
        parse_sub_model("2:ensemble", model)  # a draft or target is one sub-model
    with pytest.raises(FractalError, match="out of range"):
        parse_sub_model("123456:0", model)


def test_seeds_must_lie_below_2_63(capsys, api, random_run: Path) -> None:
    client, _ = api
    for seed in (2**63, 18446744073709551616, -1):
        r = client.post("/v1/completions", json={"prompt": "O", "max_tokens": 2, "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
        for cmd in ("sample", "speculate"):
            extra = ["--draft", "2:0"] if cmd == "speculate" else []
            code, _, err = run_cli(capsys, cmd, random_run, *extra, "--seed", seed, "--max-new-tokens", 2)
            assert code == 2 and err.strip() == f"error: seed must lie in 0 .. 2^63 - 1, got {seed}"
    r = client.post("/v1/completions", json={"prompt": "O", "max_tokens": 2, "seed": 2**63 - 1})
    assert r.status_code == 200


def test_queued_non_streaming_client_that_leaves_is_dropped(model, random_run, trained) -> None:
    """The scheduler is held inside another job while a plain (non-streaming) request
    waits in the queue; its client closes the connection; released, the scheduler drops it
    without decoding a token of it."""
    batcher = Batcher(model, max_batch=1, queue_size=4)
    held, release = threading.Event(), threading.Event()

    def hold(ev: object) -> None:
        if not held.is_set():
            held.set()
            assert release.wait(20)

    batcher.start()
    try:
        with live(trained, random_run, batcher) as base:
            batcher.submit(Job(trained.tokenizer.encode("O"), 3, (0, 0), hold))
            assert held.wait(20)
            port = int(base.rsplit(":", 1)[1])
            body = json.dumps({"prompt": "O", "max_tokens": 30}).encode()
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                until(lambda: batcher.pending.qsize() == 1)
                queued = batcher.pending.queue[0]
            until(queued.cancelled.is_set)  # the server saw the client go while the job waited
            release.set()
            until(lambda: batcher.counts["cancelled"] == 1 and batcher.status()["active"] == 0)
            assert batcher.counts["completed"] == 1  # the held job only
    finally:
        release.set()
        batcher.stop()


def test_seeded_adaptive_speculation_is_reproducible(api) -> None:
    client, _ = api
    body = {"prompt": "To be", "max_tokens": 30, "temperature": 0.9, "seed": 11,
            "speculate": {"drafts": ["2:1"], "gamma": 3}}
    first, second = (client.post("/v1/completions", json=body).json() for _ in range(2))
    assert first["choices"][0]["tokens"] == second["choices"][0]["tokens"]
    assert first["stats"]["speculative"]["rounds"] > 0  # it did draft


def guarded(trained: TrainedModel, run: Path, batcher: Batcher, api_key: str | None = None,
            extra: tuple[str, ...] = ()) -> TestClient:
    app = create_app(trained, batcher, run.name, Limits(), model_cards(trained, run),
                     allowed_hosts("127.0.0.1", extra), api_key)
    return TestClient(app, base_url="http://127.0.0.1:8000")


def test_guard_refuses_foreign_hosts_other_content_types_and_missing_keys(model, random_run, trained) -> None:
    batcher = Batcher(model)
    batcher.start()
    try:
        client = guarded(trained, random_run, batcher)
        ok = {"prompt": "O", "max_tokens": 2}
        assert client.post("/v1/completions", json=ok).status_code == 200
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "10.1.2.3:8000"):
            assert client.get("/v1/models", headers={"host": host}).status_code == 200, host
        for host in ("evil.example:8000", "evil.example", "127.0.0.1.nip.io:8000", ""):
            r = client.get("/v1/models", headers={"host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", host
        assert guarded(trained, random_run, batcher, extra=("box.lan",)).get(
            "/", headers={"host": "box.lan:8000"}).status_code == 200
        assert guarded(trained, random_run, batcher, extra=("*",)).get(
            "/", headers={"host": "any.example"}).status_code == 200
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                      None):
            headers = {"content-type": ctype} if ctype else {}
            r = client.post("/v1/completions", content=json.dumps(ok), headers=headers)
            assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], ctype
        r = client.post("/v1/completions", content=json.dumps(ok),
                        headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 200
        keyed = guarded(trained, random_run, batcher, api_key="s3cret")
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = keyed.post("/v1/completions", json=ok, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert keyed.get("/v1/models", headers=headers).status_code == 401
        good = {"authorization": "Bearer s3cret"}
        assert keyed.post("/v1/completions", json=ok, headers=good).status_code == 200
        assert keyed.get("/v1/models", headers=good).json()["api_key"] is True
        assert keyed.get("/").status_code == 200  # the page asks for the key itself
    finally:
        batcher.stop()


def test_serve_prints_where_it_listens(random_run: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "fractalformer", "serve", str(random_run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("serving http://127.0.0.1:") and line.endswith("/"), line
        port = int(line.rsplit(":", 1)[1].rstrip("/"))
        assert port > 0
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()["run"] == "random"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_max_tokens_beyond_the_context_slides_the_window_like_sample(api, model, trained) -> None:
    """Requests outgrowing the 64-token context leave the batch and slide, as generate()
    does, beside rows still inside it (batched)."""
    tok = trained.tokenizer
    specs = [("ROMEO:", 90, (0, 0)), ("O", 40, (0, 0)), ("To be, or not", 70, (2, 1)),
             ("O", 66, (1, "ensemble"))]
    jobs = [Job(tok.encode(p), n, t, print, temperature=0.8, seed=i) for i, (p, n, t) in enumerate(specs)]
    batcher = Batcher(model, max_batch=4, queue_size=4)
    events = collect(batcher, jobs)
    while batcher.step():
        pass
    for job, evs in zip(jobs, events.values(), strict=True):
        want = generate(model, job.prompt, job.max_tokens, 0.8, seed=job.seed, level=job.target[0],
                        index=job.target[1])
        assert tokens(evs) == list(want), job.target
    client, _ = api
    r = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 40, "temperature": 0,
                                             "sub_model": "2:1"})
    assert r.status_code == 200
    long = "First Citizen: " * 6  # with 40 new tokens: beyond the context of 64 tokens
    assert len(tok.encode(long)) + 40 > 64
    r = client.post("/v1/completions", json={"prompt": long, "max_tokens": 40, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["tokens"] == \
        list(generate(model, tok.encode(long), 40, 0.0))


def test_chat_completions_are_openai_shaped(api, model) -> None:
    client, _ = api
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "sub_model": "1:0"}
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "1:0"
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    prompt = "system: Be brief.\nuser: Who art thou?\nassistant:"
    assert chat_prompt([type("M", (), m)() for m in messages]) == prompt
    plain = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                 "sub_model": "1:0"}).json()
    assert choice["message"]["content"] == plain["choices"][0]["text"]
    assert out["usage"] == plain["usage"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        raw = r.read().decode().replace("\r\n", "\n")
    data = [e[6:] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}
    for bad, param in (({"messages": []}, "messages"),
                       ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
                       ({"messages": [{"role": "user"}]}, "messages.0.content"),
                       ({"prompt": "x"}, "messages")):
        r = client.post("/v1/chat/completions", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_sample_num_samples_prompt_file_and_device_mps(capsys, tmp_path: Path, random_run: Path) -> None:
    args = ["--max-new-tokens", 6, "--temperature", 0.9]
    def sample(*more: object) -> tuple[int, str, str]:
        return run_cli(capsys, "sample", random_run, *args, *more)

    code, out, _ = sample("--prompt", "O", "--seed", 3, "--num-samples", 2)
    first, second = out.split("\n" + "-" * 15 + "\n")
    assert code == 0 and first == sample("--prompt", "O", "--seed", 3)[1][:-1]
    assert second == sample("--prompt", "O", "--seed", 4)[1]
    (tmp_path / "prompt.txt").write_text("ROMEO:\nO", encoding="utf-8")
    from_file = sample("--prompt-file", tmp_path / "prompt.txt", "--seed", 1)
    assert from_file == sample("--prompt", "ROMEO:\nO", "--seed", 1)
    assert from_file[1].startswith("ROMEO:\nO")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    for bad, match in ((["--prompt-file", tmp_path / "none.txt"], "cannot read --prompt-file"),
                       (["--prompt-file", tmp_path / "latin1.txt"], "not UTF-8"),
                       (["--prompt-file", tmp_path / "prompt.txt", "--prompt", "x"], "not allowed with"),
                       (["--num-samples", 0], "at least 1")):
        code, _, err = run_cli(capsys, "sample", random_run, *bad)
        assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    if not torch.backends.mps.is_available():
        code, _, err = run_cli(capsys, "sample", random_run, "--device", "mps")
        assert code == 2 and err.strip() == "error: device=mps was asked for but MPS (Apple's GPU backend) " \
                                            "is not available"
