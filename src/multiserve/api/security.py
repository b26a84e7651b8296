"""Edge protections, as plain ASGI middleware so streamed responses pass through untouched.

API keys (`Authorization: Bearer`), compared in constant time, guard every route but /health
(and /metrics when configured public); request bodies are capped before they are read whole.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Iterable

from multiserve.api.errors import error_body

API_KEY_SCOPE = "multiserve.api_key"  # the index of the key a request was authorized with
ASGIApp = Callable[
    [dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]
]


async def _send_error(send, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()):
    body = json.dumps(error_body(status, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the body, if any, is left unread
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ApiKeyAuth:
    """401 with an OpenAI error body unless the request carries one of the keys."""

    def __init__(self, app: ASGIApp, keys: list[str], public_paths: frozenset[str]) -> None:
        self.app = app
        self._keys = [key.encode() for key in keys]
        self._public = public_paths

    def _matching_key(self, scope: dict) -> int | None:
        """Index of the key the request carries, or None."""
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None
        # compare against every key, so the time taken says nothing about which matched
        matches = [hmac.compare_digest(token.strip(), key) for key in self._keys]
        return matches.index(True) if any(matches) else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self._public:
            await self.app(scope, receive, send)
            return
        key = self._matching_key(scope)
        if key is not None:
            scope[API_KEY_SCOPE] = key  # who the request counts against (rate limits)
            await self.app(scope, receive, send)
            return
        await _send_error(
            send,
            401,
            "Invalid or missing API key; send 'Authorization: Bearer <key>'.",
            [(b"www-authenticate", b"Bearer")],
        )


class BodyLimit:
    """413 for a body over the limit, whether announced by Content-Length or streamed; 408 for
    one that takes longer than `timeout` seconds to arrive (a slow trickle holding a socket)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _send_error(send, 413, f"Request body larger than {self.max_bytes} bytes.")
            return
        received = 0
        body_done = False
        deadline = time.monotonic() + self.timeout

        async def limited_receive() -> dict:
            nonlocal received, body_done
            if body_done:  # later receives wait for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                raise _TooSlow from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
                body_done = not message.get("more_body", False)
            return message

        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, f"Request body larger than {self.max_bytes} bytes.")
        except _TooSlow:
            if not started:
                await _send_error(
                    send, 408, f"Request body not received within {self.timeout:g} s."
                )


class _TooLarge(BaseException):
    """Not an Exception: FastAPI turns body-reading Exceptions into a 400 before we see them."""


class _TooSlow(BaseException):
    """Not an Exception, for the same reason as _TooLarge."""
