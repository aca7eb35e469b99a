"""Hostile cases: api. Sampling settings at the edge of float range, sub-model specs and
seeds no parser should take, clients that leave, cross-site and rebinding requests, and
what users of other tools expect (chat, --num-samples, --prompt-file, --device mps).

The server cases share one live server (uvicorn in a thread, on a free loopback port)
over one tiny trained run, built on first use and kept for the battery's process."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import uvicorn

import fractalformer
from fractalformer.loading import TrainedModel
from fractalformer.serve import Batcher, Job, Limits, create_app, model_cards
from fractalformer.serve.app import allowed_hosts

from .common import Case, cli, one_line_error

KEY = "battery-key"


@dataclass
class Server:
    run: Path
    trained: TrainedModel
    batcher: Batcher
    base: str

    def client(self, key: bool = True) -> httpx.Client:
        headers = {"authorization": f"Bearer {KEY}"} if key else {}
        return httpx.Client(base_url=self.base, timeout=60, headers=headers)

    def post(self, body: dict, path: str = "/v1/completions") -> httpx.Response:
        with self.client() as c:
            return c.post(path, json=body)


@functools.cache
def tiny_run() -> Path:
    """A 2-step tiny FractalFormer (levels 3, context 32), trained once per process."""
    root = Path(tempfile.mkdtemp(prefix="hostile-api-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    proc = cli("train", "--preset", "tiny-fractal", "--quiet", "--max-steps", "2", "--set", "sample_tokens=0",
               "--set", "eval_every=1", "--out", root / "run")
    if proc.returncode:
        raise RuntimeError(f"training the battery's run failed: {proc.stderr[-300:]}")
    return root / "run"


@functools.cache
def server() -> Server:
    """The live server over :func:`tiny_run`, with an API key, allowing its own address only."""
    run = tiny_run()
    torch.set_num_threads(1)
    trained = fractalformer.load(run)
    batcher = Batcher(trained.model, max_batch=4, queue_size=8)
    app = create_app(trained, batcher, run.name, Limits(max_tokens=256), model_cards(trained, run),
                     allowed_hosts("127.0.0.1"), KEY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    batcher.start()
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    started = threading.Event()
    while not srv.started:
        if not thread.is_alive():
            raise RuntimeError("the battery's server did not start")
        started.wait(0.02)
    return Server(run, trained, batcher, f"http://127.0.0.1:{sock.getsockname()[1]}")


def _json_error(r: httpx.Response, status: int, param: str | None = None) -> str | None:
    """None when ``r`` is the JSON error ``status`` (naming ``param`` when given)."""
    if r.status_code != status:
        return f"status {r.status_code}, wanted {status}: {r.text[:200]}"
    if not r.headers.get("content-type", "").startswith("application/json"):
        return f"not JSON: {r.headers.get('content-type')}"
    if param is not None and r.json()["error"]["param"] != param:
        return f"param {r.json()['error']['param']!r}, wanted {param!r}"
    return None


def _greedy(s: Server, n: int = 6) -> list[int]:
    return s.post({"prompt": "O", "max_tokens": n, "temperature": 0}).json()["choices"][0]["tokens"]


def _samples_like_greedy(extra: dict) -> Callable[[Path], str | None]:
    def check(_: Path) -> str | None:
        s = server()
        r = s.post({"prompt": "O", "max_tokens": 6, **extra})
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        return None if r.json()["choices"][0]["tokens"] == _greedy(s) else "not the greedy tokens"
    return check


def _refused(body: dict, status: int, param: str | None) -> Callable[[Path], str | None]:
    def check(_: Path) -> str | None:
        return _json_error(server().post(body), status, param)
    return check


def _cli_ok(*args: str) -> Callable[[Path], str | None]:
    def check(_: Path) -> str | None:
        proc = cli(*args[:1], tiny_run(), *args[1:])
        if proc.returncode or "Traceback" in proc.stderr:
            return f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
        return None
    return check


def _cli_refused(*args: str | Path, match: str) -> Callable[[Path], str | None]:
    def check(work: Path) -> str | None:
        proc = cli(*args[:1], tiny_run(), *args[1:], cwd=work)
        why = one_line_error(proc)
        if why is None and match not in proc.stderr:
            return f"unexpected message: {proc.stderr.strip()[:200]}"
        return why
    return check


def queued_client_leaves(_: Path) -> str | None:
    """The scheduler is held inside another job while a plain request waits in the queue;
    its client goes away; the request must be dropped, not decoded."""
    s = server()
    held, release = threading.Event(), threading.Event()

    def hold(ev: object) -> None:
        if not held.is_set():
            held.set()
            release.wait(30)

    before = dict(s.batcher.counts)
    s.batcher.submit(Job(s.trained.tokenizer.encode("O"), 2, (0, 0), hold))
    try:
        if not held.wait(30):
            return "the holding job never ran"
        body = json.dumps({"prompt": "O", "max_tokens": 100}).encode()
        port = int(s.base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as conn:
            head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
            conn.sendall(head.encode() + body)
            if not _until(lambda: s.batcher.pending.qsize() == 1):
                return "the request never reached the queue"
            job = s.batcher.pending.queue[0]
        if not job.cancelled.wait(30):
            return "the server did not notice the client leave"
    finally:
        release.set()
    if not _until(lambda: s.batcher.counts["cancelled"] == before["cancelled"] + 1
                  and s.batcher.status()["active"] == 0):
        return f"not dropped: {s.batcher.counts}"
    decoded = s.batcher.counts["completed"] - before["completed"] - 1
    return None if decoded == 0 else "the dropped request was decoded"


def _until(cond: Callable[[], bool], seconds: float = 30) -> bool:
    wait = threading.Event()
    for _ in range(int(seconds / 0.02)):
        if cond():
            return True
        wait.wait(0.02)
    return False


def seeded_speculation_twice(_: Path) -> str | None:
    body = {"prompt": "To be", "max_tokens": 40, "temperature": 1.0, "seed": 3,
            "speculate": {"drafts": ["2:0"], "gamma": 4}}
    a, b = (server().post(body).json() for _ in range(2))
    if "choices" not in a:
        return f"refused: {a}"
    return None if a["choices"][0]["tokens"] == b["choices"][0]["tokens"] else "two answers for one seed"


def plain_text_post(_: Path) -> str | None:
    with server().client() as c:
        r = c.post("/v1/completions", content=json.dumps({"prompt": "O", "max_tokens": 2}),
                   headers={"content-type": "text/plain"})
    return _json_error(r, 415)


def rebound_host(_: Path) -> str | None:
    with server().client() as c:
        r = c.get("/v1/models", headers={"host": "attacker.example:8000"})
    return _json_error(r, 400)


def missing_key(_: Path) -> str | None:
    with server().client(key=False) as c:
        return _json_error(c.post("/v1/completions", json={"prompt": "O", "max_tokens": 2}), 401)


def beyond_context(_: Path) -> str | None:
    r = server().post({"prompt": "ROMEO:", "max_tokens": 64, "temperature": 0.8, "seed": 1})
    if r.status_code != 200:
        return f"status {r.status_code}: {r.text[:200]}"
    return None if len(r.json()["choices"][0]["tokens"]) == 64 else "not 64 tokens"


def chat(_: Path) -> str | None:
    r = server().post({"messages": [{"role": "user", "content": "Speak."}], "max_tokens": 5},
                      "/v1/chat/completions")
    if r.status_code != 200:
        return f"status {r.status_code}: {r.text[:200]}"
    choice = r.json()["choices"][0]
    if r.json()["object"] != "chat.completion" or choice["message"]["role"] != "assistant":
        return f"not OpenAI's chat shape: {r.text[:200]}"
    return None


def serve_prints_url(_: Path) -> str | None:
    proc = subprocess.Popen([sys.executable, "-m", "fractalformer", "serve", str(tiny_run()), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith("serving http://127.0.0.1:") or line.endswith(":0/"):
            return f"printed {line!r}"
        r = httpx.get(line.removeprefix("serving ") + "health", timeout=30)
        return None if r.status_code == 200 else f"/health at the printed URL: {r.status_code}"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def num_samples(_: Path) -> str | None:
    proc = cli("sample", tiny_run(), "--num-samples", "3", "--max-new-tokens", "4", "--seed", "1")
    if proc.returncode:
        return f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
    return None if proc.stdout.count("-" * 15 + "\n") == 2 else f"not 3 samples: {proc.stdout[:200]!r}"


def device_mps(work: Path) -> str | None:
    proc = cli("sample", tiny_run(), "--device", "mps", "--max-new-tokens", "2", cwd=work)
    if torch.backends.mps.is_available():
        return None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
    return one_line_error(proc)


CASES: list[Case] = [
    Case("api", "server: temperature 1e-300 samples greedily", _samples_like_greedy({"temperature": 1e-300})),
    Case("api", "server: top_p 1e-46 keeps the likeliest token", _samples_like_greedy({"top_p": 1e-46})),
    Case("api", "cli: sample --temperature 1e-300 --top-p 1e-46",
         _cli_ok("sample", "--temperature", "1e-300", "--top-p", "1e-46", "--max-new-tokens", "4")),
    Case("api", "cli: speculate --temperature 1e-300",
         _cli_ok("speculate", "--draft", "2:0", "--temperature", "1e-300", "--max-new-tokens", "4")),
    Case("api", "server: sub_model with a superscript digit",
         _refused({"prompt": "O", "sub_model": "\u00b2:ensemble"}, 400, "sub_model")),
    Case("api", "server: a 5,000-digit level", _refused({"prompt": "O", "sub_model": "9" * 5000 + ":0"}, 400,
                                                        "sub_model")),
    Case("api", "server: a 5,000-digit draft",
         _refused({"prompt": "O", "speculate": {"drafts": ["2:" + "9" * 5000]}}, 400, "speculate.drafts")),
    Case("api", "cli: speculate --draft with a superscript digit",
         _cli_refused("speculate", "--draft", "\u00b2:0", match="LEVEL:INDEX")),
    Case("api", "server: seed 2^64", _refused({"prompt": "O", "seed": 2**64}, 400, "seed")),
    Case("api", "cli: sample --seed 2^64", _cli_refused("sample", "--seed", str(2**64), match="seed")),
    Case("api", "cli: speculate --seed 2^64",
         _cli_refused("speculate", "--draft", "2:0", "--seed", str(2**64), match="seed")),
    Case("api", "server: a queued non-streaming client disconnects", queued_client_leaves),
    Case("api", "server: a seeded adaptive speculative request, twice", seeded_speculation_twice),
    Case("api", "server: POST as text/plain (cross-site form)", plain_text_post),
    Case("api", "server: a foreign Host header (DNS rebinding)", rebound_host),
    Case("api", "server: no API key when the server has one", missing_key),
    Case("api", "cli: serve --port 0 prints its URL", serve_prints_url),
    Case("api", "server: max_tokens twice the context slides", beyond_context),
    Case("api", "server: POST /v1/chat/completions", chat),
    Case("api", "cli: sample --num-samples 3", num_samples),
    Case("api", "cli: sample --prompt-file that is missing",
         _cli_refused("sample", "--prompt-file", "missing.txt", match="cannot read --prompt-file")),
    Case("api", "cli: sample --device mps", device_mps),
]
