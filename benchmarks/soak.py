"""Soak: minutes of good, bad, cancelled and overload traffic against two models at once.

    .venv/bin/python -m benchmarks.soak [--duration 120] [--warmup 20] [--threads 2]
                                        [--port 8095] [--out soak.json] [--no-fail]

One `multiserve serve` subprocess (127.0.0.1, an API key, a 64 KiB body limit) serves the embedded
model (`embedded:gemma-3-270m`) under two ids: `a` (4 slots, queue 8) and `b` (2 slots, queue 2,
the overload target). Five kinds of client run at the same time until the time is up:

* good (3 loops): chat and text completions, streamed and not, to `a` and `b`, greedy with
  `ignore_eos`, so each must return exactly its `max_tokens`. A 503 `queue_full` or
  `queue_timeout` is retried after its Retry-After (as a well-behaved client would); anything
  else (another 503 included) is a failure.
* bad (1 loop): invalid JSON, a string `max_tokens`, an unknown model, a wrong key, a body over
  the limit, a header over the limit (raw socket), a prompt over the context, `n` over the slots,
  a token id outside the vocabulary, a remote `$ref`, GET on a POST route. Each must get its
  exact 4xx status with an OpenAI error body.
* cancel (1 loop): streams dropped after their first tokens, and non-streamed requests whose
  client gives up after 0.3 s (often while queued).
* overload (1 loop): every 10 s, 3x `b`'s capacity at once on fresh connections; every answer
  must be a complete 200 or a 503 `queue_full` with Retry-After.

Memory and descriptors are sampled for the API process and every worker at quiet points (all
clients stopped and their connections closed): after the warm-up (start) and after the soak
(end), with RSS also sampled every 5 s in between. It passes when, over the warm-up and the soak,
every good request succeeded, every bad one got its status, nothing answered 5xx, no model's
worker died or was replaced since the server became ready, the server reports nothing still in
flight, and per process RSS grew by at most 16 MiB + 5% and descriptors not at all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.table import Table

from benchmarks.common.machine import machine_info
from benchmarks.common.multiserve_config import config_text, model_table, serving_config
from benchmarks.common.output import console, out
from benchmarks.common.prompts import prompt_text
from benchmarks.common.servers import HOST, RunningServer, port_taken, run_benchmark
from benchmarks.common.sse import complete, error_code, loopback_client, stream
from benchmarks.common.verdict import add_no_fail, exit_status, verdict

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 65536
MODELS = {
    "a": {"n_parallel": 4, "queue_limit": 8},
    "b": {"n_parallel": 2, "queue_limit": 2},
}
SHAPE = {"n_ctx": 1024, "step_tokens": 256, "preload": True, "queue_timeout": 60.0}
GOOD_LOOPS = 3
BURST_EVERY_S = 10.0
BURST_FACTOR = 3
SAMPLE_EVERY_S = 5.0
MAX_RETRIES = 20
MAX_RETRY_WAIT_S = 2.0
RSS_SLACK_BYTES = 16 * 2**20
RSS_SLACK_SHARE = 0.05
QUIET_S = 1.0  # after closing every client, for the server to see the connections go


# -- what happened ---------------------------------------------------------------------------


@dataclass
class Tally:
    good: Counter = field(default_factory=Counter)  # "ok", "retried", failure reasons
    bad: Counter = field(default_factory=Counter)  # case name -> times answered as expected
    cancelled: Counter = field(default_factory=Counter)
    overload: Counter = field(default_factory=Counter)  # "admitted", "refused"
    failures: list[str] = field(default_factory=list)  # first ones, with details

    def fail(self, what: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(what)

    def as_dict(self) -> dict[str, Any]:
        """Plain dicts (dataclasses.asdict would rebuild a Counter from its items' tuples)."""
        counts = {name: dict(getattr(self, name)) for name in ("good", "bad", "cancelled")}
        return {**counts, "overload": dict(self.overload), "failures": list(self.failures)}


# -- good traffic ----------------------------------------------------------------------------


def good_body(rng: random.Random, model: str, chat: bool, stream: bool) -> dict[str, Any]:
    tokens = rng.randint(8, 24)
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    text = prompt_text(rng.randrange(1000))
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


OVERLOAD_CODES = ("queue_full", "queue_timeout")  # the 503s a good client waits out


async def exchange(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[int, str]:
    """Send one request; (status, problem): "" for a complete answer, the Retry-After seconds
    for an overload 503, the response text for anything else."""
    if body["stream"]:
        answer = await stream(client, path, body, headers=AUTH)
        if answer.status == 503 and answer.code in OVERLOAD_CODES:
            return 503, answer.retry_after or ""
        if answer.status != 200:
            return answer.status, answer.body[:200]
        problem = answer.problem(body["max_tokens"])
        return 200, "" if problem is None else f"incomplete stream: {problem}"
    response = await client.post(path, json=body, headers=AUTH)
    if response.status_code == 503 and error_code(response) in OVERLOAD_CODES:
        return 503, response.headers.get("retry-after", "")
    if response.status_code != 200:
        return response.status_code, response.text[:200]
    tokens = response.json()["usage"]["completion_tokens"]
    return 200, "" if tokens == body["max_tokens"] else f"{tokens} tokens"


async def good_loop(client: httpx.AsyncClient, deadline: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        model, chat, stream = rng.choice("ab"), rng.random() < 0.5, rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = good_body(rng, model, chat, stream)
        for _ in range(MAX_RETRIES):
            status, problem = await exchange(client, path, body)
            if status == 503 and problem.isdigit():  # overloaded: wait as told, then again
                tally.good["retried"] += 1
                await asyncio.sleep(min(MAX_RETRY_WAIT_S, float(problem)))
                continue
            if status == 200 and not problem:
                tally.good["ok"] += 1
            else:
                tally.good["failed"] += 1
                tally.fail(f"good {path} {model}: HTTP {status} {problem}")
            break
        else:
            tally.good["gave_up"] += 1
            tally.fail(f"good {path} {model}: still 503 after {MAX_RETRIES} tries")


# -- bad traffic -----------------------------------------------------------------------------


async def raw_oversized_head(port: int) -> int:
    """The status a 64 KiB header gets, over a raw socket (httpx would not send it)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"j" * 65536 + b"\r\n\r\n"
    with contextlib.suppress(ConnectionError):
        writer.write(head)
        await writer.drain()
    status_line = b""
    with contextlib.suppress(ConnectionError):
        status_line = await reader.readline()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    parts = status_line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0  # 0: no answer


def bad_cases(port: int) -> list[tuple[str, int, Callable[[httpx.AsyncClient], Awaitable[Any]]]]:
    """(name, expected status, request) for every kind of bad request."""
    completions = "/v1/completions"

    def post(path: str, headers: dict[str, str] | None = None, **kwargs: Any):
        return lambda c: c.post(path, headers={**AUTH, **(headers or {})}, **kwargs)

    plain = {"model": "a", "prompt": "hello", "max_tokens": 2}
    json_ct = {"content-type": "application/json"}
    remote_ref = {"type": "json_schema", "json_schema": {"schema": {"$ref": "http://x/s.json"}}}
    return [
        ("invalid JSON", 400, post(completions, json_ct, content=b'{"model": "a", ')),
        ("string max_tokens", 400, post(completions, json={**plain, "max_tokens": "9"})),
        ("unknown model", 404, post(completions, json={**plain, "model": "gpt-5"})),
        (
            "wrong key",
            401,
            lambda c: c.post(completions, json=plain, headers={"Authorization": "Bearer no"}),
        ),
        (
            "body over limit",
            413,
            post(completions, json={**plain, "prompt": "x" * (2 * BODY_LIMIT)}),
        ),
        ("prompt over context", 400, post(completions, json={**plain, "prompt": "word " * 3000})),
        ("n over slots", 400, post(completions, json={**plain, "model": "b", "n": 3})),
        (
            "token id outside vocabulary",
            400,
            post(completions, json={**plain, "prompt": [2, 10**9]}),
        ),
        ("remote $ref", 400, post(completions, json={**plain, "response_format": remote_ref})),
        ("GET on a POST route", 405, lambda c: c.get("/v1/models/a/unload", headers=AUTH)),
        ("header over limit", 431, lambda c: raw_oversized_head(port)),
    ]


def has_error_body(response: httpx.Response) -> bool:
    with contextlib.suppress(ValueError):
        return "error" in response.json()
    return False


async def bad_loop(client: httpx.AsyncClient, deadline: float, port: int, tally: Tally) -> None:
    cases = bad_cases(port)
    while time.monotonic() < deadline:
        for name, expected, request in cases:
            answer = await request(client)
            status = answer if isinstance(answer, int) else answer.status_code
            error_body = (
                isinstance(answer, int)
                or error_code(answer) is not None
                or (
                    answer.headers.get("content-type") == "application/json"
                    and "error" in answer.json()
                )
            )
            if status == expected and error_body:
                tally.bad[name] += 1
            else:
                tally.bad["unexpected"] += 1
                text = "" if isinstance(answer, int) else answer.text[:200]
                tally.fail(f"bad '{name}': HTTP {status} (expected {expected}) {text}")
            await asyncio.sleep(0.05)


# -- cancelled requests ----------------------------------------------------------------------


async def drop_stream(client: httpx.AsyncClient, rng: random.Random) -> str:
    body = good_body(rng, rng.choice("ab"), chat=False, stream=True) | {"max_tokens": 200}
    async with client.stream("POST", "/v1/completions", json=body, headers=AUTH) as response:
        if response.status_code != 200:
            return f"refused {response.status_code}"
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                return "dropped stream"  # leaving the block closes the connection mid-stream
    return "stream ended before the drop"


async def give_up_early(client: httpx.AsyncClient, rng: random.Random) -> str:
    body = good_body(rng, rng.choice("ab"), chat=True, stream=False) | {"max_tokens": 200}
    try:
        await client.post("/v1/chat/completions", json=body, headers=AUTH, timeout=0.3)
    except httpx.TimeoutException:
        return "gave up waiting"
    return "answered within 0.3 s"


async def cancel_loop(client: httpx.AsyncClient, deadline: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        tally.cancelled[await drop_stream(client, rng)] += 1
        tally.cancelled[await give_up_early(client, rng)] += 1
        await asyncio.sleep(0.2)


# -- overload --------------------------------------------------------------------------------


async def burst(port: int, tally: Tally) -> None:
    """BURST_FACTOR x b's capacity at once, each request on its own new connection."""
    capacity = MODELS["b"]["n_parallel"] + MODELS["b"]["queue_limit"]
    tokens = 16

    async def one(i: int) -> None:
        async with loopback_client(port, 1, headers=AUTH) as client:
            outcome = await complete(client, "b", prompt_text(i), tokens)
        if outcome.status == 503 and outcome.code == "queue_full" and outcome.retry_after:
            tally.overload["refused"] += 1
        elif (problem := outcome.problem(tokens)) is None:
            tally.overload["admitted"] += 1
        else:
            tally.overload["wrong"] += 1
            tally.fail(f"overload: {problem}")

    await asyncio.gather(*(one(i) for i in range(BURST_FACTOR * capacity)))


async def overload_loop(port: int, deadline: float, tally: Tally) -> None:
    while time.monotonic() < deadline:
        await burst(port, tally)
        await asyncio.sleep(max(0.0, min(BURST_EVERY_S, deadline - time.monotonic())))


# -- processes -------------------------------------------------------------------------------


@dataclass
class ProcessSample:
    role: str  # "api" or "worker <pid>"
    rss: int
    fds: int
    threads: int


def role_of(proc: psutil.Process, api_pid: int, workers: dict[int, str]) -> str:
    if proc.pid == api_pid:
        return "api"
    if proc.pid in workers:
        return f"worker {workers[proc.pid]}"
    command = " ".join(proc.cmdline())
    kind = "resource tracker" if "resource_tracker" in command else "spare worker"
    return f"{kind} {proc.pid}"


def sample_processes(server: RunningServer, workers: dict[int, str]) -> dict[int, ProcessSample]:
    """Every process of the server; `workers` names the loaded models' worker pids."""
    api = psutil.Process(server.proc.pid)
    samples: dict[int, ProcessSample] = {}
    for proc in (api, *api.children(recursive=True)):
        with contextlib.suppress(psutil.Error), proc.oneshot():
            samples[proc.pid] = ProcessSample(
                role_of(proc, api.pid, workers),
                proc.memory_info().rss,
                proc.num_fds(),
                proc.num_threads(),
            )
    return samples


async def sample_rss_loop(
    server: RunningServer, deadline: float, trace: list[dict[str, Any]]
) -> None:
    start = time.monotonic()
    while time.monotonic() < deadline:
        samples = sample_processes(server, {})
        trace.append(
            {
                "t": round(time.monotonic() - start, 1),
                **{str(pid): s.rss for pid, s in samples.items()},
            }
        )
        await asyncio.sleep(SAMPLE_EVERY_S)


# -- the run ---------------------------------------------------------------------------------


async def traffic(
    server: RunningServer, port: int, seconds: float, tally: Tally, seed: int
) -> list[dict]:
    """Every kind of client at once for `seconds`; all connections closed when it returns."""
    deadline = time.monotonic() + seconds
    trace: list[dict[str, Any]] = []
    async with loopback_client(port, 32) as client:
        await asyncio.gather(
            *(good_loop(client, deadline, seed + i, tally) for i in range(GOOD_LOOPS)),
            bad_loop(client, deadline, port, tally),
            cancel_loop(client, deadline, seed + 100, tally),
            overload_loop(port, deadline, tally),
            sample_rss_loop(server, deadline, trace),
        )
    return trace


async def quiet_sample(
    server: RunningServer, port: int
) -> tuple[dict[int, ProcessSample], dict[str, int], dict[int, str]]:
    """Wait until the server has nothing in flight, then sample every process."""
    async with loopback_client(port, 1, headers=AUTH) as client:
        for _ in range(100):
            stats = (await client.get("/stats")).json()
            in_system = {  # admitted by the API, and still known to the worker
                m: sum(s["requests"][k] for k in ("in_system", "running", "waiting", "in_flight"))
                for m, s in stats["models"].items()
            }
            if not any(in_system.values()):
                break
            await asyncio.sleep(0.2)
    await asyncio.sleep(QUIET_S)
    workers = {s["worker_pid"]: m for m, s in stats["models"].items() if s["worker_pid"]}
    return sample_processes(server, workers), in_system, workers


async def model_workers(port: int) -> dict[int, str]:
    """Worker pid -> model, from /stats."""
    async with loopback_client(port, 1) as client:
        stats = (await client.get("/stats", headers=AUTH)).json()
    return {s["worker_pid"]: m for m, s in stats["models"].items() if s["worker_pid"]}


async def soak(args: argparse.Namespace, server: RunningServer) -> dict[str, Any]:
    ready_workers = await model_workers(args.port)
    console.print(f"warm-up: {args.warmup:.0f} s of the full mix")
    warm = Tally()
    await traffic(server, args.port, args.warmup, warm, seed=1)
    start, _, _ = await quiet_sample(server, args.port)
    console.print(f"soak: {args.duration:.0f} s")
    tally = Tally()
    began = time.monotonic()
    trace = await traffic(server, args.port, args.duration, tally, seed=2)
    elapsed = time.monotonic() - began
    end, in_system, end_workers = await quiet_sample(server, args.port)
    async with loopback_client(args.port) as client:
        health = (await client.get("/health")).status_code
    return {
        "seconds": round(elapsed, 1),
        "warmup": warm.as_dict(),
        "tally": tally.as_dict(),
        "start": {pid: asdict(s) for pid, s in start.items()},
        "end": {pid: asdict(s) for pid, s in end.items()},
        "in_system_at_end": in_system,
        "workers_at_ready": ready_workers,
        "workers_at_end": end_workers,
        "health_at_end": health,
        "rss_trace": trace,
    }


# -- verdicts and report ---------------------------------------------------------------------


def merged(result: dict[str, Any], kind: str) -> dict[str, int]:
    """Counts of one kind of traffic over the warm-up and the soak together."""
    total = Counter(result["warmup"][kind])
    total.update(result["tally"][kind])
    return dict(total)


def verdicts(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    start, end = result["start"], result["end"]
    good, over = merged(result, "good"), merged(result, "overload")
    bad = merged(result, "bad")
    bad_total = sum(v for k, v in bad.items() if k != "unexpected")
    checks = [
        (
            "every good request completed",
            good.get("ok", 0) > 0 and not (good.get("failed") or good.get("gave_up")),
            f"{good.get('ok', 0)} ok, {good.get('retried', 0)} retries after 503, "
            f"{good.get('failed', 0)} failed, {good.get('gave_up', 0)} gave up",
        ),
        (
            "every bad request got its 4xx",
            bad_total > 0 and not bad.get("unexpected"),
            f"{bad_total} as expected, {bad.get('unexpected', 0)} not",
        ),
        (
            "overload: complete 200 or 503 queue_full",
            over.get("refused", 0) > 0 and not over.get("wrong"),
            f"{over.get('admitted', 0)} admitted, {over.get('refused', 0)} refused, "
            f"{over.get('wrong', 0)} wrong",
        ),
        (
            "nothing left in flight, server healthy",
            not any(result["in_system_at_end"].values()) and result["health_at_end"] == 200,
            f"in system {result['in_system_at_end']}, /health {result['health_at_end']}",
        ),
        (
            "no worker died or restarted, no process appeared",
            result["workers_at_ready"] == result["workers_at_end"] and set(start) == set(end),
            f"model workers {sorted(result['workers_at_ready'])} at ready, "
            f"{sorted(result['workers_at_end'])} at end; {len(start)} processes after warm-up, "
            f"{len(end)} at end",
        ),
    ]
    for pid in sorted(set(start) & set(end)):
        before, after = start[pid], end[pid]
        allowed = RSS_SLACK_BYTES + RSS_SLACK_SHARE * before["rss"]
        growth = after["rss"] - before["rss"]
        peak = max((sample.get(str(pid), 0) for sample in result["rss_trace"]), default=0)
        checks.append(
            (
                f"{before['role']}: RSS flat, no fd leak",
                growth <= allowed and after["fds"] <= before["fds"],
                f"RSS {mib(before['rss'])} -> {mib(after['rss'])} MiB ({growth / 2**20:+.1f}, "
                f"peak under load {mib(peak)}), "
                f"fds {before['fds']} -> {after['fds']}, "
                f"threads {before['threads']} -> {after['threads']}",
            )
        )
    return checks


def mib(value: int) -> str:
    return f"{value / 2**20:.1f}"


def render(result: dict[str, Any], checks: Sequence[tuple[str, bool, str]]) -> Table:
    table = Table(title=f"soak: {result['seconds']:.0f} s, two models, four kinds of traffic")
    table.add_column("check")
    table.add_column("result")
    table.add_column("numbers")
    for name, ok, numbers in checks:
        table.add_row(name, verdict(ok, miss="FAIL"), numbers)
    cancelled = ", ".join(f"{v} {k}" for k, v in merged(result, "cancelled").items())
    table.add_row("cancelled requests", "", cancelled)
    return table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--duration", type=float, default=120.0, help="soak seconds")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before the baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8095)
    parser.add_argument("--out", type=Path, help="write the full result as JSON")
    add_no_fail(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if port_taken(args.port):
        return 2
    models = [model_table(name, **SHAPE, **fields) for name, fields in MODELS.items()]
    server_fields = {"api_keys": [KEY], "max_body_bytes": BODY_LIMIT}
    config = config_text(args.threads, models, server_fields=server_fields)
    with (
        tempfile.TemporaryDirectory(prefix="multiserve-soak-") as tmp,
        serving_config("soak", config, Path(tmp), args.port, loaded=list(MODELS)) as server,
    ):
        result = asyncio.run(soak(args, server))
    checks = verdicts(result)
    result["machine"] = machine_info()
    result["checks"] = [{"check": n, "pass": ok, "numbers": s} for n, ok, s in checks]
    out.print(render(result, checks))
    for failure in result["warmup"]["failures"] + result["tally"]["failures"]:
        console.print(f"[red]{failure}[/red]")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return exit_status([name for name, ok, _ in checks if not ok], args.no_fail)


if __name__ == "__main__":
    run_benchmark(main)
