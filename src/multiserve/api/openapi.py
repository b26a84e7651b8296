"""The published OpenAPI document says what the server really answers.

FastAPI's defaults promise a 422 we never send and omit the statuses we do (OpenAI error bodies
with 400, 401, 404, 405, 408, 409, 413, 429, 431, 500, 503; server-sent events for streams). Clients
generated from the document, and the schema-driven fuzz tests, rely on it being true.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The OpenAI error body every failure carries."""

    error: ErrorDetail


_MEANINGS = {
    400: "Invalid request; `error.param` names the parameter.",
    404: "Unknown model.",
    405: "The path reads as another route (e.g. an id with a raw '?' or '#'): percent-encode it.",
    409: "The model is busy.",
    429: "Over this key's `requests_per_minute`; see the Retry-After header.",
    500: "llama.cpp failed to compute the request (`decode_failed`).",
    503: "Overloaded, loading, failed or shutting down; see the Retry-After header.",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that can fail with these statuses."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": ErrorResponse, "description": _MEANINGS[status]}
        if status in (429, 503):
            responses[status]["headers"] = _RETRY_AFTER
    return responses


EVENT_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A completion; with `stream: true`, server-sent events ending in [DONE].",
        "content": {
            "text/event-stream": {
                # one server-sent event: `data` is a JSON chunk, or [DONE] at the end
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "string"}},
                }
            }
        },
    }
}

# Answered before a route runs: (status, description, only for requests with a body)
_EDGE_ERRORS = (
    (408, "Request head or body not received within `header_timeout` / `body_timeout`.", False),
    (413, "Request body larger than `max_body_bytes`.", True),
    (431, "Request line and headers larger than `max_header_bytes`.", False),
    (503, "More than `max_connections` open connections; see Retry-After.", False),
)


def publish_openapi(app: FastAPI, protected: bool, public_paths: frozenset[str]) -> None:
    """Replace `app.openapi` with one that documents the middleware's answers too."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, protected, public_paths)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error_ref(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }


def _document(app: FastAPI, protected: bool, public_paths: frozenset[str]) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if protected:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if responses.pop("422", None) is not None:  # validation failures are 400s here
                responses.setdefault("400", _error_ref(_MEANINGS[400]))
            for status, description, with_body in _EDGE_ERRORS:
                if method == "post" or not with_body:
                    responses.setdefault(str(status), _error_ref(description))
            if protected and path not in public_paths:
                operation["security"] = [{"bearer": []}]
                responses["401"] = _error_ref("Missing or wrong API key.")
    return schema
