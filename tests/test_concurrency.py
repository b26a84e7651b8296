"""Continuous batching under load: many requests at once, and cancelled streams free their slots."""

from __future__ import annotations

import asyncio
import time

import httpx
from openai import AsyncOpenAI


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


def test_long_prompt_does_not_freeze_running_streams(server) -> None:
    """A prompt bigger than a step's token budget is read in chunks between decode steps."""
    long_prompt = "hello world " * 80  # ~160 tokens > step_tokens (64)
    with server.http() as http:
        body = {
            "model": "tiny",
            "prompt": "the",
            "max_tokens": 60,
            "stream": True,
            "ignore_eos": True,
        }
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            next(lines)
            other = http.post(
                "/v1/completions", json={"model": "tiny", "prompt": long_prompt, "max_tokens": 2}
            )
            assert other.status_code == 200
            rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
