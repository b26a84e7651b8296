"""Streamed completions and chats, timed as they arrive, on loopback clients.

The event stream is read by `multiserve bench`'s own strict reader (`stream_events`), so the
benchmarks and the load tester agree on what a complete answer is. `stream` never raises on an
HTTP status or a broken stream: a flood or a soak needs every answer as it came, and a benchmark
that wants a clean answer asks for it with `Streamed.raise_for_failure` or `require_complete`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.common.servers import HOST
from multiserve.bench.client import StreamFailure, choice_text, stream_events
from multiserve.bench.workload import Endpoint

EXACT_GREEDY = {"ignore_eos": True, "temperature": 0}  # every admitted request: max_tokens tokens


def loopback_client(
    port: int,
    connections: int = 100,
    *,
    keepalive: bool = True,
    timeout_s: float = 600.0,
    connect_s: float = 5.0,
    headers: dict[str, str] | None = None,
) -> httpx.AsyncClient:
    """A client of HOST:port that never goes through a proxy (`trust_env=False`)."""
    return httpx.AsyncClient(
        base_url=f"http://{HOST}:{port}",
        trust_env=False,
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=connect_s),
        limits=httpx.Limits(
            max_connections=connections, max_keepalive_connections=connections if keepalive else 0
        ),
    )


@dataclass
class Streamed:
    """What came back for one streamed request, whatever it was; times are perf_counter seconds."""

    model: str
    asked: int  # max_tokens
    exact: bool  # sent with ignore_eos: `asked` tokens are owed, not just allowed
    status: int
    t_send: float
    t_response: float  # 200: headers read; otherwise: the whole error response read
    t_end: float = 0.0
    t_chunks: list[float] = field(default_factory=list)  # every chunk with text (about a token)
    text: str = ""
    completion_tokens: int = 0  # from the usage chunk; 0 without one
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    finish_reason: str | None = None
    done: bool = False  # the stream ended with `data: [DONE]`
    code: str | None = None  # error code of a refusal
    retry_after: str | None = None
    body: str = ""  # the text of an error response
    stream_error: str | None = None  # what broke a stream after its 200

    @property
    def t_first(self) -> float | None:
        """When the first chunk with text came (None: none came)."""
        return self.t_chunks[0] if self.t_chunks else None

    @property
    def t_last(self) -> float | None:
        return self.t_chunks[-1] if self.t_chunks else None

    @property
    def ttft(self) -> float:
        return (self.t_first or self.t_end) - self.t_send

    @property
    def response_s(self) -> float:
        return self.t_response - self.t_send

    @property
    def decode_tok_s(self) -> float:
        """Decode speed from the first text to the last, so prefill is left out."""
        span = (self.t_last or 0.0) - (self.t_first or 0.0)
        return (self.completion_tokens - 1) / max(span, 1e-9)

    def problem(self, tokens: int | None = None) -> str | None:
        """Why this is not a complete answer (of exactly `tokens` tokens, if given), or None."""
        if self.status != 200:
            return f"HTTP {self.status} ({self.code})"
        if self.stream_error:
            return f"stream error {self.stream_error}"
        if not self.done or (tokens is not None and self.completion_tokens != tokens):
            owed = self.asked if tokens is None else tokens
            return f"{self.completion_tokens}/{owed} tokens, [DONE] seen: {self.done}"
        return None

    def raise_for_failure(self) -> Streamed:
        """Self if the server answered with text and a clean end; RuntimeError otherwise."""
        if self.status != 200:
            raise RuntimeError(f"HTTP {self.status}: {self.body[:500]}")
        if (problem := self.problem()) is not None:
            raise RuntimeError(problem)
        if not self.text:
            raise RuntimeError("the stream carried no text")
        return self


def error_code(response: httpx.Response) -> str | None:
    """The `error.code` of an OpenAI error body, if it has one."""
    with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError):
        return response.json()["error"]["code"]
    return None


async def stream(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Streamed:
    """POST `body` to `path` streamed with usage; text and timings of every chunk recorded."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    endpoint: Endpoint = "chat" if "chat" in path else "completions"
    t_send = time.perf_counter()
    async with client.stream("POST", path, json=body, headers=headers) as response:
        result = Streamed(
            model=str(body.get("model")),
            asked=int(body.get("max_tokens") or 0),
            exact=bool(body.get("ignore_eos")),
            status=response.status_code,
            t_send=t_send,
            t_response=time.perf_counter(),
        )
        if response.status_code != 200:
            await response.aread()
            result.t_response = result.t_end = time.perf_counter()
            result.code, result.body = error_code(response), response.text
            result.retry_after = response.headers.get("retry-after")
            return result
        try:
            await _read(response, endpoint, result)
            result.done = True
        except StreamFailure as failure:
            result.stream_error = failure.error.message
    result.t_end = time.perf_counter()
    return result


async def _read(response: httpx.Response, endpoint: Endpoint, result: Streamed) -> None:
    async for chunk in stream_events(response):
        now = time.perf_counter()
        if usage := chunk.get("usage"):
            result.completion_tokens = usage.get("completion_tokens") or 0
            result.prompt_tokens = usage.get("prompt_tokens") or 0
            result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        for choice in chunk.get("choices") or ():
            if text := choice_text(choice, endpoint):
                result.t_chunks.append(now)
                result.text += text
            result.finish_reason = choice.get("finish_reason") or result.finish_reason


async def complete(
    client: httpx.AsyncClient, model: str, prompt: str, tokens: int, **extra: object
) -> Streamed:
    """A streamed /v1/completions; greedy with ignore_eos (exactly `tokens` tokens) unless
    `extra` says otherwise."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, **EXACT_GREEDY, **extra}
    return await stream(client, "/v1/completions", body)


def require_complete(outcomes: Sequence[Streamed], tokens: int) -> None:
    """Raise unless every outcome is a complete answer of exactly `tokens` tokens."""
    for outcome in outcomes:
        if (problem := outcome.problem(tokens)) is not None:
            raise RuntimeError(f"request to {outcome.model}: {problem}")


def decode_rate(replies: Sequence[Streamed]) -> float:
    """Tokens/s while every stream decodes: the chunks (a token each, bar a held-back partial
    character) from the last stream's first token to the first stream's last one, over that
    time. The prompts, read in the steps before, are left out, as they are for one stream."""
    start = max(r.t_first or r.t_end for r in replies)
    end = min(r.t_last or r.t_end for r in replies)
    if end <= start:
        raise RuntimeError("the streams never decoded at the same time")
    return sum(start < t <= end for r in replies for t in r.t_chunks) / (end - start)
