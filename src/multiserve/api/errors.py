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
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "Unknown route."
        return JSONResponse(
            error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, "Internal server error."), status_code=500)
