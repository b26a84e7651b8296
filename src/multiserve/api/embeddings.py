"""/v1/embeddings on a worker: one `Embed` request, its vectors shaped as OpenAI's body.

`encoding_format: "base64"` sends each vector as the base64 of its little-endian float32 bytes,
as OpenAI does (and as the official client asks for unless told otherwise).
"""

from __future__ import annotations

import base64
import logging

from multiserve.api.errors import APIError
from multiserve.api.generation import (
    DECODE_ERROR_MESSAGE,
    WORKER_GONE_MESSAGE,
    shutting_down,
)
from multiserve.backends.client import RequestCut, RequestStream, RunningModel, WorkerGone
from multiserve.engine.protocol import Embed, Embedded, Rejected
from multiserve.fleet.admission import Ticket

log = logging.getLogger(__name__)


class EmbeddingFailed(Exception):
    """The request failed on its worker: `error` answers the client, `kind` labels the metric."""

    def __init__(self, kind: str, error: APIError) -> None:
        super().__init__(error.message)
        self.kind = kind
        self.error = error


def open_embedding(engine: RunningModel, request: Embed) -> RequestStream:
    """The request, opened on its worker; called before anything is awaited after the worker
    was got, so the worker cannot be stopped in between (see routes._engine)."""
    try:
        return engine.open(request)
    except WorkerGone:
        raise EmbeddingFailed("worker_exit", _worker_gone()) from None
    except RequestCut:
        raise EmbeddingFailed("shutting_down", shutting_down()) from None


def _worker_gone() -> APIError:
    return APIError(503, WORKER_GONE_MESSAGE, code="model_crashed", headers={"Retry-After": "1"})


async def embed(stream: RequestStream, ticket: Ticket) -> Embedded:
    """The request's vectors, or EmbeddingFailed. The caller closes the stream (which cancels
    the request in the worker if it has not finished), however the wait ends."""
    try:
        reply = await stream.next()
    except WorkerGone:
        raise EmbeddingFailed("worker_exit", _worker_gone()) from None
    except RequestCut:
        log.warning("request %s cut short: the server is shutting down", stream.request.request_id)
        raise EmbeddingFailed("shutting_down", shutting_down()) from None
    if isinstance(reply, Rejected) and reply.timed_out:
        error = APIError(
            503,
            "The request waited too long in the queue; retry later.",
            code="queue_timeout",
            headers={"Retry-After": str(ticket.retry_after())},
        )
        raise EmbeddingFailed("queue_timeout", error)
    if isinstance(reply, Rejected):
        error = APIError(400, reply.message, param=reply.param, code=reply.code)
        raise EmbeddingFailed("rejected", error)
    assert isinstance(reply, Embedded)
    if reply.vectors is None:
        error = APIError(500, DECODE_ERROR_MESSAGE, code="decode_failed")
        raise EmbeddingFailed("decode", error)
    return reply


def embedding_body(embedded: Embedded, model: str, encoding_format: str | None) -> dict:
    """OpenAI's response: a list of embeddings, each at its input's index, and the usage."""
    vectors = embedded.vectors
    assert vectors is not None
    if encoding_format == "base64":
        rows: list = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in vectors]
    else:
        rows = vectors.tolist()
    tokens = embedded.prompt_tokens
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": row}
            for index, row in enumerate(rows)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
