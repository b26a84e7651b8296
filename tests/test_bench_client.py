"""The bench client on scripted streams (httpx.MockTransport): timing, token counts, error kinds,
and 429/503 backoff. Whatever the server does, `send` returns a record and never raises."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from multiserve.bench.client import (
    BenchClient,
    ClientOptions,
    RequestRecord,
    backoff_delay,
    parse_retry_after,
)
from multiserve.bench.workload import Prompt

PROMPT = Prompt(None, [{"role": "user", "content": "hi there"}], 4, 2)
SSE = {"content-type": "text/event-stream"}


def chunk(text: str | None = None, finish: str | None = None, **extra) -> str:
    delta = {} if text is None else {"content": text}
    choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": choices, **extra})


USAGE = "data: " + json.dumps(
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}}
)
ROLE = "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})


def sse(*lines: str) -> bytes:
    return "".join(f"{line}\n\n" for line in lines).encode()


def send(
    handler: Callable[[httpx.Request], object],
    prompt: Prompt = PROMPT,
    **options,
) -> tuple[RequestRecord, BenchClient]:
    async def run() -> tuple[RequestRecord, BenchClient]:
        opts = ClientOptions(url="http://bench.test:8082", model="m", **options)
        async with BenchClient(opts, transport=httpx.MockTransport(handler)) as client:
            return await client.send(0, prompt), client

    return asyncio.run(run())


def test_normal_stream_with_usage() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = sse(
            ROLE, chunk("a"), chunk("b"), chunk("cd"), chunk(None, "length"), USAGE, "data: [DONE]"
        )
        return httpx.Response(200, headers=SSE, content=body)

    record, _ = send(handler, api_key="k")
    assert record.success, record.error
    assert (record.output_tokens, record.output_token_source) == (4, "usage")
    assert (record.input_tokens, record.input_token_source) == (7, "usage")
    assert len(record.chunk_times) == 3  # the role-only and finish chunks carry no text
    assert record.finish_reason == "length"
    assert record.ttft is not None and 0 <= record.ttft <= record.e2el
    assert len(record.itl) == 2
    request = seen[0]
    assert str(request.url) == "http://bench.test:8082/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k"
    body = json.loads(request.content)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 4
    assert "ignore_eos" not in body and "seed" not in body  # only when asked for


def test_completions_endpoint_and_ignore_eos() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        text = "data: " + json.dumps({"choices": [{"index": 0, "text": "x"}]})
        last = "data: " + json.dumps(
            {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
        )
        return httpx.Response(200, headers=SSE, content=sse(text, text, last, "data: [DONE]"))

    prompt = Prompt("once upon", None, 2, 2)
    record, _ = send(handler, prompt, endpoint="completions", ignore_eos=True, seed=3)
    assert record.success
    assert (record.output_tokens, record.output_token_source) == (2, "chunks")
    assert seen[0].url.path == "/v1/completions"
    body = json.loads(seen[0].content)
    assert (body["prompt"], body["ignore_eos"], body["seed"]) == ("once upon", True, 3)


def test_stream_without_usage_counts_chunks() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = sse(chunk("a"), chunk("b"), chunk("c", "stop"), "data: [DONE]")
        return httpx.Response(200, headers=SSE, content=body)

    record, _ = send(handler)
    assert record.success
    assert (record.output_tokens, record.output_token_source) == (3, "chunks")
    assert record.input_token_source == "estimate"
    assert record.input_tokens == 2


@pytest.mark.parametrize(
    ("lines", "kind", "words"),
    [
        ((chunk("a"), "data: {not json", "data: [DONE]"), "malformed_stream", "invalid JSON"),
        ((chunk("a"), "garbage line", "data: [DONE]"), "malformed_stream", "not an SSE line"),
        ((chunk("a"), chunk("b")), "malformed_stream", "before data: [DONE]"),
        ((chunk("a"), USAGE, "data: [DONE]"), "malformed_stream", "without a finish_reason"),
        (
            (chunk("a"), 'data: {"error": {"message": "worker died", "code": 500}}'),
            "stream_error",
            "worker died",
        ),
        ((chunk("a"), 'event: error\ndata: {"message": "boom"}'), "stream_error", "boom"),
    ],
)
def test_bad_streams_are_errors(lines: tuple[str, ...], kind: str, words: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=SSE, content=sse(*lines))

    record, _ = send(handler)
    assert not record.success
    assert record.error.kind == kind
    assert words in record.error.message


def test_connection_cut_mid_stream() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield sse(chunk("a"))
        raise httpx.RemoteProtocolError("peer closed connection")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=SSE, content=body())

    record, _ = send(handler)
    assert record.error.kind == "malformed_stream"
    assert len(record.chunk_times) == 1


def test_503_retry_after_is_honoured_then_success() -> None:
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.perf_counter())
        if len(calls) == 1:
            error = {"error": {"message": "overloaded", "code": "queue_full"}}
            return httpx.Response(503, headers={"Retry-After": "0.3"}, json=error)
        body = sse(chunk("a", "stop"), USAGE, "data: [DONE]")
        return httpx.Response(200, headers=SSE, content=body)

    record, _ = send(handler, backoff_base=0.01)
    assert record.success
    assert record.refusals == 1
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.3  # waited what the server asked...
    assert 0.3 <= record.retry_wait < 0.3 * 1.1 + 0.1  # ...plus at most the 10% jitter
    assert record.sent >= calls[1] - 0.05  # latency is timed from the attempt that succeeded


def test_429_exhaustion_is_an_error_with_backoff() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(429, json={"error": {"message": "slow down"}})

    record, _ = send(handler, max_retries=2, backoff_base=0.01)
    assert calls == 3
    assert record.refusals == 3
    assert (record.error.kind, record.error.status) == ("http_4xx", 429)
    assert record.error.message == "slow down"
    assert record.retry_wait >= 0.01 + 0.02  # exponential: base, then 2 * base


def test_other_statuses_are_not_retried() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        status = 400 if calls == 1 else 500
        return httpx.Response(status, json={"error": {"message": f"status {status}"}})

    record, _ = send(handler)
    assert (record.error.kind, record.error.status, record.refusals) == ("http_4xx", 400, 0)
    record, _ = send(handler)
    assert (record.error.kind, record.error.status) == ("http_5xx", 500)
    assert calls == 2


def test_timeout_connect_and_unexpected_failures_never_raise() -> None:
    async def slow() -> AsyncIterator[bytes]:
        yield sse(chunk("a"))
        await asyncio.sleep(5)
        yield sse("data: [DONE]")

    def slow_handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=SSE, content=slow())

    started = time.perf_counter()
    record, _ = send(slow_handler, timeout=0.2)
    assert record.error.kind == "timeout"
    assert time.perf_counter() - started < 2

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    assert send(refuse)[0].error.kind == "connect"

    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug in the transport")

    record, _ = send(broken)
    assert record.error.kind == "client_error"
    assert "a bug" in record.error.message


def test_retry_after_parsing_and_backoff_cap() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    import random

    rng = random.Random(0)
    assert 5.0 <= backoff_delay(0, 5.0, 0.5, 30.0, rng) <= 5.5
    assert 30.0 <= backoff_delay(0, 3600.0, 0.5, 30.0, rng) <= 33.0  # capped
    assert 4.0 <= backoff_delay(3, None, 0.5, 30.0, rng) <= 4.4  # 0.5 * 2**3
