"""Load test of ``fractalformer serve``: concurrent streaming clients on the loopback.

    python -m bench.bench_serve RUN_DIR [--clients 1,4,16] [--tokens 128] [--requests 8]
                                [--sub-model 0:0] [--threads 1] [--time-limit 150]

Starts the server as a subprocess on a free 127.0.0.1 port (nothing else is contacted),
then for each concurrency level N runs N clients, each streaming ``--requests`` greedy
completions of ``--tokens`` tokens one after another (client i always sends prompt i,
so the rows of a batch sit at different positions). First every prompt is decoded
alone, one request at a time: the reference that every later (batched) answer must
equal token for token. Prints a markdown table: aggregate tokens/s (all tokens over the
level's wall time), per-request latency (request to last token) p50/p99, time to first
token, errors, and the speed-up over one client. Bounded: a fixed number of requests,
a timeout per request and ``--time-limit`` seconds overall; the server is always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from harness import machine, script_parser

PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nBefore we proceed", "KING HENRY", "To be",
           "MENENIUS:\nWhat", "Thou art", "O, ", "LADY MACBETH:\nOut, damned spot", "All:\nSpeak, speak.",
           "Good morrow", "HAMLET:\nWords, words", "My lord,", "Now is the winter", "Come, come",
           "BRUTUS:\nPeace!"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, body: dict, timeout: float) -> dict:
    """Stream one completion; returns its tokens, latency, time to first token, or an error."""
    t0 = time.perf_counter()
    tokens: list[int] = []
    first = None
    done = False
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                msg = json.loads(data)
                if "error" in msg:
                    return {"error": msg["error"]["message"]}
                choice = msg["choices"][0]
                if choice["finish_reason"] is None:
                    first = first or time.perf_counter()
                    tokens.append(choice["token"])
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if not done or len(tokens) != body["max_tokens"]:
        return {"error": f"stream ended after {len(tokens)} tokens (done={done})"}
    return {"tokens": tokens, "latency": end - t0, "ttft": (first or end) - t0}


def body(prompt: str, a: argparse.Namespace) -> dict:
    return {"prompt": prompt, "max_tokens": a.tokens, "temperature": 0, "stream": True,
            "sub_model": a.sub_model}


async def level(base: str, n: int, a: argparse.Namespace, deadline: float) -> tuple[list[dict], float]:
    """``n`` clients, each sending ``a.requests`` requests in turn; returns results and wall time."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, limits=limits) as client:
        async def worker(i: int) -> list[dict]:
            out = []
            for _ in range(a.requests):
                if time.perf_counter() > deadline:
                    out.append({"error": "time limit reached", "prompt": i})
                    continue
                out.append({**await one_request(client, body(PROMPTS[i], a), a.timeout), "prompt": i})
            return out

        t0 = time.perf_counter()
        results = await asyncio.gather(*(worker(i) for i in range(n)))
        return [r for rs in results for r in rs], time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def run(base: str, a: argparse.Namespace) -> None:
    deadline = time.perf_counter() + a.time_limit
    counts = [int(c) for c in a.clients.split(",")]
    n_prompts = max(counts)
    if n_prompts > len(PROMPTS):
        raise SystemExit(f"at most {len(PROMPTS)} clients")
    # the reference: every prompt decoded alone (this also warms the server up)
    reference: dict[int, list[int]] = {}
    async with httpx.AsyncClient(base_url=base) as client:
        for i in range(n_prompts):
            r = await one_request(client, body(PROMPTS[i], a), a.timeout)
            if "error" in r:
                raise SystemExit(f"reference request {i} failed: {r['error']}")
            reference[i] = r["tokens"]
    rows = []
    base_rate = None
    for n in counts:
        results, wall = await level(base, n, a, deadline)
        ok = [r for r in results if "error" not in r]
        errors = [r["error"] for r in results if "error" in r]
        differ = sum(r["tokens"] != reference[r["prompt"]] for r in ok)
        made = sum(len(r["tokens"]) for r in ok)
        rate = made / wall
        base_rate = base_rate or rate
        lat = [r["latency"] for r in ok] or [float("nan")]
        ttft = [r["ttft"] for r in ok] or [float("nan")]
        rows.append(f"| {n} | {len(results)} | {made:,} | {wall:.2f} | {rate:,.0f} | "
                    f"{rate / base_rate:.2f}x | {pct(lat, 0.5):.3f} | {pct(lat, 0.99):.3f} | "
                    f"{pct(ttft, 0.5) * 1000:.0f} | {len(errors)} | {differ} |")
        for e in sorted(set(errors))[:3]:
            print(f"  error ({n} clients): {e}", file=sys.stderr)
    async with httpx.AsyncClient(base_url=base) as client:
        health = (await client.get("/health")).json()
    print(f"machine: {machine()}")
    print(f"server: fractalformer serve {a.run} (OMP_NUM_THREADS={a.threads}), sub-model {a.sub_model}, "
          f"{a.tokens} tokens a request, greedy, {a.requests} requests per client; peak batch "
          f"{health['peak_batch']}, completed {health['completed']}, failed {health['failed']}")
    print()
    print("| clients | requests | tokens | wall s | aggregate tokens/s | vs 1 client | latency p50 s | "
          "latency p99 s | first token p50 ms | errors | differ from solo |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("run")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=8, help="requests each client sends, one after another")
    ap.add_argument("--sub-model", default="0:0")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    ap.add_argument("--time-limit", type=float, default=150.0, help="seconds for the whole test")
    a = ap.parse_args()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    server = subprocess.Popen([sys.executable, "-m", "fractalformer", "serve", a.run, "--host", "127.0.0.1",
                               "--port", str(port), "--max-batch", "16"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        start = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read().strip()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - start > 60:
                raise SystemExit("the server did not come up within 60 s")
            time.sleep(0.25)
        asyncio.run(run(base, a))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        if server.returncode not in (0, 130, -signal.SIGINT):  # 130: the CLI's exit after Ctrl-C
            print(f"server exit status {server.returncode}: {server.stderr.read()[-2000:]}", file=sys.stderr)


if __name__ == "__main__":
    main()
