"""OpenAI-style error bodies for every failure, so clients' error handling just works.

`{"error": {"message", "type", "param", "code"}}` with the right status; validation errors become
400 naming the parameter (never FastAPI's 422), and nothing internal (tracebacks, paths) leaks.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from multiserve.api.schemas import NO_OP_VALUES

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """Raise anywhere in a route to answer with an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None):
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_not_found(name: str) -> APIError:
    return APIError(
        404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
    )


# OpenAI API routes this server does not serve (yet), so a client learns which call it lacks.
OPENAI_ROUTES = (
    "/v1/responses",
    "/v1/images",
    "/v1/audio",
    "/v1/moderations",
    "/v1/files",
    "/v1/uploads",
    "/v1/batches",
    "/v1/fine_tuning",
    "/v1/assistants",
    "/v1/threads",
    "/v1/vector_stores",
    "/v1/realtime",
    "/v1/conversations",
    "/v1/containers",
    "/v1/evals",
    "/v1/chat/completions/",
)
MAX_ROUTE_ECHO = 120


def unknown_route(method: str, path: str) -> tuple[str, str]:
    """The 404 message and code for a route that does not exist here, naming it."""
    route = f"{method} {path[:MAX_ROUTE_ECHO]}"
    if any(path == r.rstrip("/") or path.startswith(r.rstrip("/") + "/") for r in OPENAI_ROUTES):
        return (
            f"`{route}` is part of the OpenAI API but not implemented by this server.",
            "unsupported_route",
        )
    return f"Unknown route `{route}`.", "unknown_route"


# pydantic names a union member in an error's location by its type: 'str', 'list[int]', ...
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|constrained-\w+|[\w-]+\[.*\])$")


def param_path(loc: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union member names are dropped."""
    parts = list(loc[1:] if loc[:1] == ("body",) else loc)
    if parts[-1:] == ["[key]"]:  # a bad dictionary key: name the dictionary, not the key
        parts = parts[:-2]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _UNION_MEMBER.match(str(part)):
            out += f".{part}" if out else str(part)
    return out


def _most_telling(errors: list[dict]) -> dict:
    """Of a union's errors, the one from the member whose type matched (a broken constraint)."""
    mismatch = ("_type", "_parsing")
    return next((e for e in errors if not e.get("type", "").endswith(mismatch)), errors[0])


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = _most_telling(list(exc.errors()))
    param = param_path(tuple(first.get("loc", ()))) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "Request body is not valid JSON.", None
    if kind in ("model_attributes_type", "dict_type") and not param:
        return "Request body must be a JSON object.", None
    if kind == "extra_forbidden" and param:
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing" and param:
        return f"Missing required parameter: '{param}'.", param
    field = param.split(".")[0].split("[")[0] if param else None
    if field in NO_OP_VALUES:
        return (
            f"`{field}` is accepted only as {NO_OP_VALUES[field]}: other values are not "
            "supported by this server",
            field,
        )
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"Invalid value for '{param}': {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        code = None
        if exc.status_code == 404:
            message, code = unknown_route(request.method, request.url.path)
        return JSONResponse(
            error_body(exc.status_code, message, code=code),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, "Internal server error."), status_code=500)
