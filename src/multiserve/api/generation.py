"""Runs one request on a worker and answers it: one JSON body, or SSE chunks ending in [DONE].

The response starts only when the worker accepts the request into its sequence slots, so a
refusal is a proper status even for streaming clients: 400 for bad input, 503 for a request that
waited in the queue past its timeout. A client that goes away (while queued or generating)
cancels its request in the worker, which frees its slots within one step. A request the server
cuts at shutdown ends properly too: 503, or an error event and `[DONE]` in a stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from multiserve.api.errors import APIError, error_body
from multiserve.api.formats import ChoiceResult, Usage, WireFormat
from multiserve.api.metrics import RequestTracker
from multiserve.api.request_group import RequestGroup
from multiserve.backends.client import RequestCut, RunningModel, WorkerGone
from multiserve.engine.protocol import ChoiceDelta, Generate, Rejected
from multiserve.fleet.admission import Ticket

log = logging.getLogger(__name__)
SHUTTING_DOWN_MESSAGE = "The server is shutting down."
WORKER_GONE_MESSAGE = "The model stopped unexpectedly while generating; please retry."
DECODE_ERROR_MESSAGE = "The model failed to compute this request; please retry."
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; never seen by it

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


def shutting_down() -> APIError:
    return APIError(503, SHUTTING_DOWN_MESSAGE, code="shutting_down", headers={"Retry-After": "5"})


def _cut(request_id: str, model: str) -> None:
    log.warning("request %s (%s) cut short: the server is shutting down", request_id, model)


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _EventStream(StreamingResponse):
    """SSE response that always frees its request, however the connection ends.

    The body generator frees it too, but a client gone before the first chunk means the
    generator never starts and its `finally` never runs.
    """

    def __init__(self, body: AsyncIterator[str], cleanup: Callable[[], object]) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but give up with ClientDisconnected as soon as the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # our own wait was cancelled (a deadline): the work stops too
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected


async def generate(
    http_request: Request,
    engine: RunningModel,
    requests: list[Generate],
    fmt: WireFormat,
    tracker: RequestTracker,
    ticket: Ticket,
    *,
    stream: bool,
    include_usage: bool,
) -> Response:
    """Answer `requests` (one per prompt) as one response; the ticket is released when the answer
    is complete or abandoned."""
    handed_over = False
    group: RequestGroup | None = None
    try:
        group = RequestGroup(engine, requests)
        first = await unless_disconnected(http_request, group.accepted())
        if isinstance(first, Rejected):
            tracker.failed("queue_timeout" if first.timed_out else "rejected")
            if first.timed_out:
                raise APIError(
                    503,
                    "The request waited too long in the queue; retry later.",
                    code="queue_timeout",
                    headers={"Retry-After": str(ticket.retry_after())},
                )
            raise APIError(400, first.message, param=first.param, code=first.code)
        if stream:
            body = _stream(group, fmt, tracker, ticket, first.prompt_tokens, include_usage)
            handed_over = True
            return _EventStream(body, cleanup=lambda: (group.close(), ticket.release()))
        collected = _collect(group, fmt, tracker, first.prompt_tokens)
        return JSONResponse(await unless_disconnected(http_request, collected))
    except WorkerGone:
        tracker.failed("worker_exit")
        raise APIError(
            503, WORKER_GONE_MESSAGE, code="model_crashed", headers={"Retry-After": "1"}
        ) from None
    except RequestCut:
        tracker.failed("shutting_down")
        _cut(requests[0].request_id, fmt.model)
        raise shutting_down() from None
    except ClientDisconnected:
        tracker.failed("client_disconnected")
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        if not handed_over:
            if group is not None:
                group.close()
            ticket.release()


class _DecodeFailed(Exception):
    pass


async def _deltas(group: RequestGroup, tracker: RequestTracker) -> AsyncIterator[ChoiceDelta]:
    """The request's token deltas until every choice has finished."""
    async for event in group.deltas():
        if event.finish_reason == "error":
            tracker.failed("decode")
            raise _DecodeFailed
        yield event


async def _collect(
    group: RequestGroup, fmt: WireFormat, tracker: RequestTracker, prompt_tokens: int
) -> dict:
    results = [ChoiceResult() for _ in range(group.n)]
    completion_tokens = 0
    try:
        async for delta in _deltas(group, tracker):
            result = results[delta.index]
            completion_tokens += delta.new_tokens
            result.text.append(delta.text)
            result.logprobs.extend(delta.logprobs)
            result.finish_reason = delta.finish_reason or result.finish_reason
            if delta.text:
                tracker.delivered()
    except _DecodeFailed:
        raise APIError(500, DECODE_ERROR_MESSAGE, code="decode_failed") from None
    usage = Usage(prompt_tokens, completion_tokens, group.cached_tokens)
    tracker.finished(usage, [r.finish_reason or "" for r in results])
    return fmt.body(results, usage)


async def _stream(
    group: RequestGroup,
    fmt: WireFormat,
    tracker: RequestTracker,
    ticket: Ticket,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    completion_tokens = 0
    reasons: list[str] = []
    try:
        for chunk in fmt.opening_chunks(group.n):
            yield _sse(chunk)
        async for delta in _deltas(group, tracker):
            completion_tokens += delta.new_tokens
            if delta.finish_reason:
                reasons.append(delta.finish_reason)
            if delta.text or delta.finish_reason or delta.logprobs:
                chunks = fmt.chunks(delta.index, delta.text, delta.logprobs, delta.finish_reason)
                for chunk in chunks:
                    yield _sse(chunk)
                if delta.text:
                    tracker.delivered()
        usage = Usage(prompt_tokens, completion_tokens, group.cached_tokens)
        tracker.finished(usage, reasons)
        if include_usage:
            yield _sse(fmt.usage_chunk(usage))
    except _DecodeFailed:
        yield _sse(error_body(500, DECODE_ERROR_MESSAGE, code="decode_failed"))
    except WorkerGone:
        tracker.failed("worker_exit")
        yield _sse(error_body(500, WORKER_GONE_MESSAGE, code="model_crashed"))
    except RequestCut:
        tracker.failed("shutting_down")
        _cut(group.streams[0].request.request_id, fmt.model)
        yield _sse(error_body(503, SHUTTING_DOWN_MESSAGE, code="shutting_down"))
    except (asyncio.CancelledError, GeneratorExit):
        tracker.failed("client_disconnected")
        raise
    finally:
        group.close()
        ticket.release()
    yield _sse("[DONE]")
