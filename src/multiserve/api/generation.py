"""Runs one request on a worker and answers it: one JSON body, or SSE chunks ending in [DONE].

The worker's first event decides the status: `Rejected` is a 400 before any byte is streamed, so
streaming clients get proper error statuses too. A client that goes away cancels its request in
the worker (the stream is closed in `finally`), which frees its slots within one step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from multiserve.api.errors import APIError, error_body
from multiserve.api.formats import ChoiceResult, ResponseFormat
from multiserve.api.metrics import RequestTracker
from multiserve.engine.client import EngineClient, RequestStream, WorkerGone
from multiserve.engine.protocol import Accepted, ChoiceDelta, Generate, Rejected

WORKER_GONE_MESSAGE = "The model stopped unexpectedly while generating; please retry."
DECODE_ERROR_MESSAGE = "The model failed to compute this request; please retry."


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def generate(
    engine: EngineClient,
    request: Generate,
    fmt: ResponseFormat,
    tracker: RequestTracker,
    *,
    stream: bool,
    include_usage: bool,
) -> JSONResponse | StreamingResponse:
    events = engine.open(request)
    try:
        first = await events.next()
    except WorkerGone:
        events.close()
        tracker.failed("worker_exit")
        raise APIError(500, WORKER_GONE_MESSAGE, code="model_crashed") from None
    except BaseException:
        events.close()
        raise
    if isinstance(first, Rejected):
        events.close()
        tracker.failed("rejected")
        raise APIError(400, first.message, param=first.param)
    assert isinstance(first, Accepted)
    if stream:
        body = _stream(events, fmt, tracker, first.prompt_tokens, include_usage)
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        return JSONResponse(await _collect(events, fmt, tracker, first.prompt_tokens))
    finally:
        events.close()


async def _collect(
    events: RequestStream, fmt: ResponseFormat, tracker: RequestTracker, prompt_tokens: int
) -> dict:
    results = [ChoiceResult() for _ in range(events.request.n)]
    completion_tokens = 0
    try:
        while not events.done:
            event = await events.next()
            if not isinstance(event, ChoiceDelta):
                continue
            if event.finish_reason == "error":
                tracker.failed("decode")
                raise APIError(500, DECODE_ERROR_MESSAGE, code="decode_failed")
            result = results[event.index]
            completion_tokens += event.new_tokens
            result.text.append(event.text)
            result.logprobs.extend(event.logprobs)
            result.finish_reason = event.finish_reason or result.finish_reason
            if event.text:
                tracker.delivered()
    except WorkerGone:
        tracker.failed("worker_exit")
        raise APIError(500, WORKER_GONE_MESSAGE, code="model_crashed") from None
    tracker.finished(prompt_tokens, completion_tokens, [r.finish_reason or "" for r in results])
    return fmt.body(results, prompt_tokens, completion_tokens)


async def _stream(
    events: RequestStream,
    fmt: ResponseFormat,
    tracker: RequestTracker,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    completion_tokens = 0
    reasons: list[str] = []
    try:
        for chunk in fmt.opening_chunks(events.request.n):
            yield _sse(chunk)
        while not events.done:
            event = await events.next()
            if not isinstance(event, ChoiceDelta):
                continue
            if event.finish_reason == "error":
                tracker.failed("decode")
                yield _sse(error_body(500, DECODE_ERROR_MESSAGE, code="decode_failed"))
                break
            completion_tokens += event.new_tokens
            if event.finish_reason:
                reasons.append(event.finish_reason)
            if event.text or event.finish_reason or event.logprobs:
                yield _sse(fmt.chunk(event.index, event.text, event.logprobs, event.finish_reason))
                if event.text:
                    tracker.delivered()
        else:
            tracker.finished(prompt_tokens, completion_tokens, reasons)
            if include_usage:
                yield _sse(fmt.usage_chunk(prompt_tokens, completion_tokens))
    except WorkerGone:
        tracker.failed("worker_exit")
        yield _sse(error_body(500, WORKER_GONE_MESSAGE, code="model_crashed"))
    except (asyncio.CancelledError, GeneratorExit):
        tracker.failed("client_disconnected")
        raise
    finally:
        events.close()
    yield _sse("[DONE]")
