"""Continuous batching under load: many requests at once, and cancelled streams free their slots."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass

import httpx
from openai import AsyncOpenAI

from tiny_gguf import TOKEN_TO_ID


def test_sixteen_concurrent_requests_all_complete(server) -> None:
    async def run() -> list:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        async with client:
            calls = [
                client.completions.create(
                    model="tiny",
                    prompt=f"request {i}",
                    max_tokens=20,
                    seed=i,
                    extra_body={"ignore_eos": True},
                )
                for i in range(16)
            ]
            return await asyncio.gather(*calls)

    replies = asyncio.run(run())
    assert len(replies) == 16
    assert all(r.usage.completion_tokens == 20 for r in replies)
    assert all(r.choices[0].finish_reason == "length" for r in replies)


def _requests(http: httpx.Client, model: str) -> dict:
    return http.get("/stats").json()["models"][model]["requests"]


def test_cancelled_streams_free_their_slots(server) -> None:
    """Fill both slots of a 2-slot model with long streams, drop them, and it serves again.

    8000 tokens take this tiny model several seconds, so slots free within a second can only
    come from the cancellation, not from the streams running out.
    """
    body = {
        "model": "tiny-2slots",
        "prompt": "hello",
        "max_tokens": 8000,
        "stream": True,
        "ignore_eos": True,
    }
    with server.http() as http:
        for _ in range(2):  # twice: freed slots must be reusable
            streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(2)]
            responses = [s.__enter__() for s in streams]
            readers = [response.iter_lines() for response in responses]  # kept: GC would hang up
            for response, reader in zip(responses, readers, strict=True):
                assert response.status_code == 200
                next(reader)  # generation is under way
            assert _requests(http, "tiny-2slots")["running"] == 2
            for stream in streams:
                stream.__exit__(None, None, None)  # the client goes away mid-stream
            cancelled_at = time.monotonic()
            while _requests(http, "tiny-2slots")["running"]:
                assert time.monotonic() - cancelled_at < 1.0, "slots were not freed"
                time.sleep(0.02)
            quick = {"model": "tiny-2slots", "prompt": "hi", "max_tokens": 3}
            assert http.post("/v1/completions", json=quick, timeout=10).status_code == 200
            assert _requests(http, "tiny-2slots")["in_flight"] == 0


# Every decode step gives this stream exactly one " hello" chunk, so its chunks count steps.
_HELLO_STREAM = {
    "model": "tiny-2slots",
    "prompt": "the",
    "max_tokens": 4000,  # outlasts the test, which cancels it when it has seen enough
    "stream": True,
    "temperature": 0,
    "logit_bias": {str(TOKEN_TO_ID["\u2581hello"]): 100},
}
STEP_TOKENS = 64  # tiny-2slots' step_tokens in conftest.TINY_CONFIG
# 8001 tokens, read uncached: about 127 chunks of the 63 tokens the running stream leaves free
_LONG_PROMPT = {
    "model": "tiny-2slots",
    "prompt": "hello world " * 4000,
    "max_tokens": 1,
    "stream": True,
    "cache_prompt": False,
}


async def _token_times(url: str, body: dict, times: list[float], started: asyncio.Event) -> None:
    """Append the arrival time of every SSE event of a stream; set `started` after 20."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.monotonic())
                if len(times) == 20:
                    started.set()


@dataclass
class _LongPrompt:
    """When the long prompt was sent, accepted (its response starts) and answered (1st token)."""

    sent: float = 0.0
    accepted: float = 0.0
    answered: float = 0.0


async def _read_long_prompt(url: str) -> _LongPrompt:
    timing = _LongPrompt()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        timing.sent = time.monotonic()
        async with http.stream("POST", "/v1/completions", json=_LONG_PROMPT) as response:
            timing.accepted = time.monotonic()
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {") and not timing.answered:
                    timing.answered = time.monotonic()
    return timing


async def _stream_during_long_prompt(url: str) -> tuple[list[float], _LongPrompt]:
    """Token arrival times of a running stream while the long prompt is read."""
    times: list[float] = []
    started = asyncio.Event()
    stream = asyncio.create_task(_token_times(url, _HELLO_STREAM, times, started))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({stream, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if stream.done():
        stream.result()  # the stream failed: raise its error
    assert started.is_set(), "the stream did not start"
    try:
        timing = await _read_long_prompt(url)
    finally:
        stream.cancel()  # the client goes away: the server frees the slot
        with contextlib.suppress(asyncio.CancelledError):
            await stream
    return times, timing


def test_long_prompt_does_not_freeze_running_streams(server) -> None:
    """A prompt bigger than a step's token budget is read in chunks between decode steps.

    While an 8000-token prompt is read, a running stream must keep getting a token every step,
    one per chunk (~127), never waiting for the whole prompt. Read unchunked, the prompt is one
    long llama_decode during which the stream gets nothing.

    The reading is counted from the long request's acceptance (its response starts when the
    worker takes it, after the first chunk) to its first token, so stream tokens sent while it
    was on its way do not count. The bound on the stream's gaps (from the last token before the
    prompt was sent) is relative to how long the reading took (over a second), not to the
    stream's gaps before: a step with a 63-token chunk over thousands of cells is rightly tens of
    times slower than a lone one-token step (~0.5 ms, which an SSE client reading coalesced lines
    cannot even resolve). Unchunked, the longest gap is nearly all of it.
    """
    times, long = asyncio.run(_stream_during_long_prompt(server.url))
    reading = [t for t in times if long.accepted <= t <= long.answered]
    assert len(reading) >= 60, f"{len(reading)} stream tokens while ~127 prompt chunks were read"
    edges = [max(t for t in times if t < long.sent)]
    edges += [t for t in times if long.sent <= t <= long.answered] + [long.answered]
    longest = max(b - a for a, b in itertools.pairwise(edges))
    took = long.answered - long.sent
    assert longest < took / 2, f"the stream waited {longest:.3f}s of the prompt's {took:.3f}s"
