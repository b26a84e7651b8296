"""uvicorn's httptools protocol with limits on what a client can hold before the app sees it.

llhttp, under httptools, sets none, and uvicorn cancels its keep-alive timer at the first byte a
client sends. So one client could make the server buffer gigabytes of header, or hold sockets
open forever by trickling a byte at a time (slowloris). This protocol caps:

* the request head (request line plus headers) in bytes: 431. Two counts bound the memory to the
  limit plus one socket read: the head as the parser hands it over (a head that arrives whole in
  one read), and the bytes read without the parser getting anywhere (one endless header or
  trailer line, which it buffers without a callback until the line ends);
* the time from a connection's start, a request's first byte or the previous response's end to
  a complete head: 408 (and a connection whose request body the app left unread closes);
* the number of open connections: 503 with Retry-After, at once.

Every refusal is an OpenAI error body; the connection then closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from multiserve.api.errors import error_body

log = logging.getLogger(__name__)
LINGER_SECONDS = 2.0  # how long a refused client may go on sending before the socket closes


@dataclass(frozen=True)
class ConnectionLimits:
    max_head_bytes: int
    head_timeout: float
    max_connections: int


def limited_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """The protocol class to give `uvicorn.Config(http=...)`."""

    class LimitedProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._parsed_head = 0
            self._stalled_bytes = 0  # read since the parser last finished a head or body part
            self._progress = 0
            self._too_large = False
            self._refused = False
            self._head_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self._refuse(503, f"More than {limits.max_connections} open connections.")
            else:
                self._start_head_timer()  # a client that connects and says nothing is cut off

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        # -- the head's deadline --------------------------------------------------------------

        def _start_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(limits.head_timeout, self._head_too_slow)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self._refused or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self._start_head_timer()  # reading is paused behind a response: not the client
                return
            self._refuse(408, f"Request head not received within {limits.head_timeout:g} s.")

        def on_response_complete(self) -> None:
            """Between requests uvicorn's keep-alive timer runs until the client's next byte;
            ours covers what it does not: a blank line and silence, or a body the app answered
            without reading (401, 413...), trickled on: those connections close."""
            super().on_response_complete()
            if self._refused or self.transport.is_closing():
                return
            if self.cycle is not None and self.cycle.more_body:
                self._close_after_linger()
            elif not self.pipeline:
                self._start_head_timer()

        # -- parser callbacks: once over the limit, the rest of this read is parsed and dropped

        def on_message_begin(self) -> None:
            self._parsed_head = 0
            self._start_head_timer()
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            if self._counted(len(url)):
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._counted(len(name) + len(value) + 4):  # ": " and CRLF
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._progress += 1
            self._stop_head_timer()
            if not self._too_large:
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._progress += 1
            if not self._too_large:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._progress += 1
            if not self._too_large:
                super().on_message_complete()

        def _counted(self, size: int) -> bool:
            """Add to the current head; False once it is over the limit."""
            self._parsed_head += size
            self._too_large = self._too_large or self._parsed_head > limits.max_head_bytes
            return not self._too_large

        # -- reads ----------------------------------------------------------------------------

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # lingering after a refusal: whatever else the client sends is dropped
            progress_before = self._progress
            if not self._too_large:
                super().data_received(data)
            if self._progress == progress_before:
                self._stalled_bytes += len(data)
                self._too_large = self._too_large or self._stalled_bytes > limits.max_head_bytes
            else:
                self._stalled_bytes = 0
            if self._too_large:
                self._refuse(
                    431, f"Request line and headers larger than {limits.max_head_bytes} bytes."
                )

        def _refuse(self, status: int, message: str) -> None:
            """Answer, then linger. With an earlier pipelined response still being written,
            there is no clean way to answer: just close."""
            self._refused = True
            self._stop_head_timer()
            log.warning("refused a connection from %s: %s", self.client, message)
            self.pipeline.clear()
            if self.cycle is not None and not self.cycle.response_complete:
                self.transport.close()
                return
            body = json.dumps(error_body(status, message)).encode()
            retry = "retry-after: 1\r\n" if status == 503 else ""
            head = (
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                "content-type: application/json\r\n"
                f"content-length: {len(body)}\r\n{retry}"
                "connection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
            self._close_after_linger()

        def _close_after_linger(self) -> None:
            """Stop reading and writing, but keep the socket a moment: closing with unread
            input would reset the connection and could destroy the last answer."""
            self._refused = True
            self._stop_head_timer()
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)

    return LimitedProtocol
