"""HTTP API and page: FastAPI routes over the :class:`~fractalformer.serve.batcher.Batcher`.

``POST /v1/completions`` takes OpenAI's completion fields (prompt, max_tokens,
temperature, top_p, stream, seed) plus ``sub_model`` ("L:J" or "L:ensemble"),
``ensemble`` and ``speculate``; ``stream`` answers with server-sent events in OpenAI's
chunk format, ending with ``data: [DONE]``. ``POST /v1/chat/completions`` takes
``messages`` instead of ``prompt`` (rendered by :func:`chat_prompt`). ``GET /v1/models``
lists every sub-model and level ensemble, ``GET /health`` the scheduler's state, ``GET /``
the page.

Every error is JSON, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx
status for the client's mistakes and 503 when the queue is full; nothing a client sends
stops the server. Requests must name an allowed Host (DNS rebinding) and POST
``application/json`` (a web page cannot send that cross-site without the server's
consent), and carry the API key when the server has one.
"""

from __future__ import annotations

import asyncio
import csv
import hmac
import ipaddress
import json
import socket
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import checkpoint as ckpt
from ..errors import FractalError
from ..evaluate import to_bpc
from ..generate.sampling import SEED_LIMIT
from ..generate.speculative import check_speculation, parse_sub_model
from ..loading import TrainedModel, load
from ..runs import load_val_units_per_token, prepare_data
from ..train.logs import parse_sub_name
from .batcher import Batcher, Event, Failed, Finished, Job, QueueFull, Target, Token


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may wait: load cannot exhaust memory."""

    max_tokens: int = 1024  # per request (past the context the window slides)
    max_prompt_chars: int = 8192
    max_batch: int = 16  # requests decoded together
    queue_size: int = 64  # requests waiting beyond those; more get 503

    @property
    def max_body_bytes(self) -> int:  # a JSON-escaped prompt takes up to 6 bytes a character
        return 6 * self.max_prompt_chars + 4096


class Speculation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    drafts: list[str] = Field(min_length=1, max_length=8)
    gamma: int = Field(4, ge=1, le=16)
    adaptive: bool = True  # draft only while drafting pays (measured); False: always gamma tokens


class _Sampling(BaseModel):
    """OpenAI's fields that apply here, plus the sub-model choice: what both endpoints take."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    sub_model: str | None = None  # "L:J" or "L:ensemble"; default "0:0"
    model: str | None = None  # OpenAI clients send one: a /v1/models id, a synonym of sub_model
    ensemble: bool = False  # the whole level of sub_model, as one ensemble
    speculate: Speculation | None = None


class CompletionRequest(_Sampling):
    prompt: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


def chat_prompt(messages: list[Message]) -> str:
    """The plain role-tagged template of a conversation: one ``role: content`` line per
    message, then ``assistant:`` for the model to continue (these models know no other)."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else \
            {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


def allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str] | None:
    """The Host names a request may give: the bound host, ``localhost`` and ``extra`` (any
    IP address is accepted too: DNS rebinding needs a name); None (any) when ``extra`` has "*"."""
    if "*" in extra:
        return None
    return frozenset(h.strip("[]").lower() for h in (host, "localhost", *extra))


class Guard:
    """ASGI middleware refusing, before any route runs, a Host that is not allowed (400), a
    missing or wrong API key on /v1/ (401) and a POST that is not application/json (415)."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None, api_key: str | None) -> None:
        self.app, self.hosts, self.key = app, hosts, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refuse(Headers(scope=scope), scope["method"], scope["path"])
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refuse(self, headers: Headers, method: str, path: str) -> ApiError | None:
        host = headers.get("host", "")
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] \
            if host.rpartition(":")[2].isdigit() else host
        if self.hosts is not None and not _is_ip(name) and name.lower() not in self.hosts:
            return ApiError(400, f"Host {host[:100]!r} is not allowed; start the server with "
                                 f"--allow-host NAME to serve it under that name", code="host_not_allowed")
        if self.key is not None and path.startswith("/v1/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                return ApiError(401, "this server needs an API key: Authorization: Bearer KEY",
                                kind="authentication_error", code="invalid_api_key")
        if method == "POST":
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                return ApiError(415, f"the body must be sent as Content-Type: application/json, got "
                                     f"{media[:60] or 'none'!r}")
        return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def target_id(target: Target) -> str:
    return f"{target[0]}:{target[1]}"


def parse_target(spec: str, model: torch.nn.Module, param: str) -> Target:
    """'L:J' or 'L:ensemble' -> (L, J) or (L, "ensemble"); 404 for one the model lacks."""
    try:
        return parse_sub_model(spec, model, ensemble=True)
    except FractalError as e:
        status = 404 if "out of range" in str(e) else 400
        raise ApiError(status, str(e), param, code="model_not_found" if status == 404 else None) from None


def model_cards(trained: TrainedModel, run_dir: Path) -> list[dict[str, Any]]:
    """Every sub-model and level ensemble: width, parameters, last validation bits/char."""
    step, losses, units = _last_validation(trained, run_dir) if trained.mix is None else (None, {}, None)
    model = trained.model
    created = int(ckpt.current(run_dir).model.stat().st_mtime)
    cards = []
    for lv in range(model.nest.levels):
        n = model.nest.count(lv)
        width = model.sub_model_config(lv).d_model
        for j in [*range(n), *(["ensemble"] if n > 1 else [])]:
            loss = losses.get((lv, j))
            cards.append({
                "id": target_id((lv, j)), "object": "model", "created": created, "owned_by": "fractalformer",
                "level": lv, "index": j, "width": width,
                "params": trained.mix_params or model.num_params(lv) * (n if j == "ensemble" else 1),
                "standalone": model.needed_levels(lv) == [lv],
                "val_loss": round(loss, 4) if loss is not None else None,
                "val_bpc": round(to_bpc(loss, units), 4) if loss is not None and units else None,
                "val_step": step if loss is not None else None,
            })
    return cards


def _last_validation(trained: TrainedModel, run_dir: Path) -> tuple[int | None, dict, float | None]:
    """(step, {(level, index): nats/token}, characters per token) of the run's last
    validation in metrics.csv; empty when the run has none (or its data is gone)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None, {}, None
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss")]
    if not rows:
        return None, {}, None
    last = rows[-1]
    losses: dict[tuple[int, int | str], float] = {(0, 0): float(last["val_loss"])}
    for key, value in last.items():
        sub = parse_sub_name(key.removeprefix("val_")) if key and key.startswith("val_") else None
        if sub is not None and value:
            losses[sub] = float(value)
    units = load_val_units_per_token(run_dir)
    if units is None:  # a run saved before training recorded it: tokenise its validation text
        try:
            units = prepare_data(trained.run_config, trained.tokenizer)[1].val_units_per_token
        except FractalError:
            units = None
    return int(last["step"]), losses, units


def create_app(trained: TrainedModel, batcher: Batcher, name: str, limits: Limits,
               cards: list[dict[str, Any]], hosts: frozenset[str] | None = None,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app; ``batcher`` is started and stopped by the caller (see ``serve``),
    ``cards`` (``model_cards``) is what /v1/models lists, ``hosts`` the Host names allowed
    (:func:`allowed_hosts`; None: any) and ``api_key`` the bearer token /v1/ needs (None: none)."""
    app = FastAPI(title="FractalFormer", summary=f"serving {name}", version="0.1.0")
    app.add_middleware(Guard, hosts=hosts, api_key=api_key)
    model, tok = trained.model, trained.tokenizer
    ctx = model.config.block_size
    max_tokens = limits.max_tokens  # the window slides past the context, as fractalformer sample's does
    page = resources.files("fractalformer.serve").joinpath("static", "index.html").read_text(encoding="utf-8")
    info = {"run": name, "context": ctx, "unit": tok.unit, "tokenizer": tok.name,
            "limits": {"max_tokens": max_tokens, "max_prompt_chars": limits.max_prompt_chars,
                       "max_batch": batcher.max_batch, "queue_size": batcher.pending.maxsize},
            "api_key": api_key is not None}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return ApiError(e.status_code, str(e.detail)).response()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "stopped", **info, **batcher.status()},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", **info, "data": cards}

    def make_job(req: _Sampling, prompt: str, emit: Any, cancelled: threading.Event) -> tuple[Job, str, int]:
        """The scheduler's job, the sub-model's id and the prompt's length in tokens (the
        model sees its last ``ctx`` tokens, as fractalformer sample's model does)."""
        if req.sub_model and req.model and req.sub_model != req.model:
            raise ApiError(400, "give the sub-model once: 'sub_model' and 'model' differ", "model")
        param = "sub_model" if req.sub_model else "model"
        target = parse_target(req.sub_model or req.model or "0:0", model, param)
        if req.ensemble:
            target = (target[0], "ensemble")
        if req.max_tokens > max_tokens:
            raise ApiError(400, f"max_tokens must be at most {max_tokens}, got {req.max_tokens}",
                           "max_tokens")
        where = "prompt" if isinstance(req, CompletionRequest) else "messages"
        if len(prompt) > limits.max_prompt_chars:
            raise ApiError(400, f"the prompt has {len(prompt)} characters; at most "
                                f"{limits.max_prompt_chars} are accepted", where)
        try:
            ids = tok.encode(prompt)
        except FractalError as e:
            raise ApiError(400, str(e).split(" (use ")[0], where) from None
        if not ids:
            raise ApiError(400, "the prompt is empty", where)
        drafts: list[tuple[int, int]] = []
        gamma, adaptive = 4, True
        if req.speculate is not None:
            if target[1] == "ensemble":
                raise ApiError(400, "speculative decoding needs a single sub-model as its target, "
                                    "not an ensemble", "speculate")
            parsed = [parse_target(d, model, "speculate.drafts") for d in req.speculate.drafts]
            if any(j == "ensemble" for _, j in parsed):
                raise ApiError(400, "a draft is a single sub-model, not an ensemble", "speculate.drafts")
            drafts = [(lv, int(j)) for lv, j in parsed]
            gamma, adaptive = req.speculate.gamma, req.speculate.adaptive
            try:
                check_speculation(model, drafts, (target[0], int(target[1])), gamma, ids)
            except FractalError as e:
                raise ApiError(400, str(e), "speculate") from None
        job = Job(ids[-ctx:], req.max_tokens, target, emit, req.temperature, req.top_k,
                  req.top_p if req.top_p < 1.0 else None, req.seed, drafts, gamma, adaptive, cancelled)
        return job, target_id(target), len(ids)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = _parse(await _read_body(request, limits.max_body_bytes), CompletionRequest)
        return await answer(request, req, req.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = _parse(await _read_body(request, limits.max_body_bytes), ChatRequest)
        return await answer(request, req, chat_prompt(req.messages), chat=True)

    async def answer(request: Request, req: _Sampling, prompt: str, chat: bool) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(ev: Event) -> None:  # called from the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (shutting down): stop decoding this one
                cancelled.set()

        job, model_id, prompt_tokens = make_job(req, prompt, emit, cancelled)
        if not batcher.alive:
            raise ApiError(503, "the scheduler is not running", kind="server_error")
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise ApiError(503, f"{e}; retry later", kind="server_error", code="queue_full") from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_id}
        decode = tok.stream_decoder()
        usage = {"prompt_tokens": prompt_tokens}
        if req.stream:
            return EventSourceResponse(_stream(events, cancelled, head, decode, usage, chat), ping=15)
        return await _collect(request, events, cancelled, head, decode, usage, chat)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before it is all read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes")
    return bytes(body)


def _parse(body: bytes, kind: type[_Sampling]) -> Any:
    try:
        return kind.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {err['msg']}") from None
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field {where!r}", where) from None
        if err["type"] == "model_type":
            raise ApiError(400, "the body must be a JSON object") from None
        raise ApiError(400, f"{where}: {err['msg']}" if where else err["msg"], where or None) from None


def _chunk(head: dict, text: str, chat: bool, finish: str | None = None, first: bool = False,
           **extra: Any) -> dict:
    """A streamed chunk: ``text`` as a completion's text or a chat message's delta."""
    if not chat:
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                     **extra}]}
    delta = {"role": "assistant", "content": text} if first else {"content": text} if text or not finish \
        else {}
    return {**head, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}]}


def _whole(head: dict, text: str, chat: bool, **extra: Any) -> dict:
    """A non-streamed answer: the completion's text or the assistant's message."""
    if not chat:
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                                     **extra}]}
    message = {"role": "assistant", "content": text}
    return {**head, "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "length",
                                 **extra}]}


def _token_fields(ev: Token) -> dict:
    return {"token": ev.id} if ev.drafted is None else {"token": ev.id, "drafted": ev.drafted}


async def _stream(events: asyncio.Queue[Event], cancelled: threading.Event, head: dict, decode: Any,
                  usage: dict, chat: bool) -> AsyncIterator[dict]:
    """Server-sent events: one chunk per token, a last chunk with the finish reason, usage
    and timings, then [DONE]. A client that goes away cancels the request."""
    n = 0
    try:
        while True:
            ev = await events.get()
            if isinstance(ev, Token):
                n += 1
                chunk = _chunk(head, decode(ev.id), chat, first=n == 1, **_token_fields(ev))
                yield {"data": json.dumps(chunk)}
            elif isinstance(ev, Finished):
                yield {"data": json.dumps({**_chunk(head, "", chat, "length"), "stats": ev.stats,
                                           "usage": _usage(usage, n)})}
                yield {"data": "[DONE]"}
                return
            else:
                yield {"data": json.dumps(_error_body(ev))}
                return
    finally:
        cancelled.set()  # no-op for a finished request


async def _collect(request: Request, events: asyncio.Queue[Event], cancelled: threading.Event, head: dict,
                   decode: Any, usage: dict, chat: bool) -> JSONResponse:
    """The whole answer at once; a client that goes away (queued or decoding) cancels the
    request: nothing else would notice before the answer is sent."""
    tokens: list[Token] = []
    watcher = asyncio.create_task(_gone(request, events))
    try:
        while True:
            ev = await events.get()
            if isinstance(ev, Token):
                tokens.append(ev)
            elif isinstance(ev, Finished):
                break
            else:
                return JSONResponse(_error_body(ev), status_code=ev.status)
    finally:
        watcher.cancel()
        cancelled.set()
    extra: dict[str, Any] = {"tokens": [t.id for t in tokens]}
    if tokens and tokens[0].drafted is not None:
        extra["drafted"] = [t.drafted for t in tokens]
    text = "".join(decode(t.id) for t in tokens)
    return JSONResponse({**_whole(head, text, chat, **extra), "usage": _usage(usage, len(tokens)),
                         "stats": ev.stats})


async def _gone(request: Request, events: asyncio.Queue[Event]) -> None:
    """Wait for the client to disconnect (its body is read: nothing else arrives), then end
    the wait for its answer."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(Failed("the client went away", 499))


def _usage(usage: dict, n: int) -> dict:
    return {**usage, "completion_tokens": n, "total_tokens": usage["prompt_tokens"] + n}


def _error_body(ev: Failed) -> dict:
    kind = "invalid_request_error" if ev.status < 500 else "server_error"
    return {"error": {"message": ev.message, "type": kind, "param": None, "code": None}}


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          log_level: str = "info", allow_hosts: list[str] | tuple[str, ...] = (),
          api_key: str | None = None, mix: str | None = None) -> None:
    """Load the run (or its Mix'n'Match model ``mix``), bind the port, print where it listens,
    and serve until interrupted (Ctrl-C)."""
    limits = limits or Limits()
    run = Path(run)
    trained = load(run, mix=mix)
    if trained.config.family == "concept":  # its caches advance concept levels per row position
        raise FractalError("fractalformer serve cannot batch the concept family yet; use "
                           "fractalformer sample")
    if api_key is not None and not api_key.strip():
        raise FractalError("the API key is empty")
    sock = _bind(host, port)
    batcher = Batcher(trained.model, limits.max_batch, limits.queue_size)
    app = create_app(trained, batcher, run.name, limits, model_cards(trained, run),
                     allowed_hosts(host, allow_hosts), api_key)
    if api_key is None and not _loopback(sock):
        warnings.warn(f"{host} is reachable beyond this machine and there is no --api-key: anyone who "
                      f"reaches it can use the server", stacklevel=2)
    print(f"serving {_url(host, sock)}", flush=True)
    batcher.start()
    try:
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        batcher.stop()
        sock.close()


def _url(host: str, sock: socket.socket) -> str:
    """http://HOST:PORT/ with the port the socket really has (``--port 0``: the one chosen)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{sock.getsockname()[1]}/"


def _loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, so that a port in use is a one-line error before anything starts."""
    if not 0 <= port < 65536:
        raise FractalError(f"port must lie in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FractalError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise FractalError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock
