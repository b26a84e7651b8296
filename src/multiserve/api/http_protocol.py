"""uvicorn's httptools protocol with a cap on the request head (request line plus headers).

llhttp, under httptools, sets no limit: a client could make the server buffer gigabytes of header
before the app sees anything. Two counts bound it to the limit plus one socket read: the head as
the parser hands it over (a head that arrives whole in one read), and the bytes read without the
parser getting anywhere (one endless header or trailer line, which it buffers without a callback
until the line ends). Over the limit the client gets a 431 and the connection closes.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from multiserve.api.errors import error_body

log = logging.getLogger(__name__)
LINGER_SECONDS = 2.0  # how long a refused client may go on sending before the socket closes


def bounded_head_protocol(max_head_bytes: int) -> type[HttpToolsProtocol]:
    """The protocol class to give `uvicorn.Config(http=...)`."""

    class BoundedHeadProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._parsed_head = 0
            self._stalled_bytes = 0  # read since the parser last finished a head or body part
            self._progress = 0
            self._too_large = False
            self._refused = False
            super().connection_made(transport)

        # -- parser callbacks: once over the limit, the rest of this read is parsed and dropped

        def on_message_begin(self) -> None:
            self._parsed_head = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            if self._counted(len(url)):
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._counted(len(name) + len(value) + 4):  # ": " and CRLF
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._progress += 1
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
            self._too_large = self._too_large or self._parsed_head > max_head_bytes
            return not self._too_large

        # -- reads ----------------------------------------------------------------------------

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # lingering after a 431: whatever else the client sends is dropped
            progress_before = self._progress
            if not self._too_large:
                super().data_received(data)
            if self._progress == progress_before:
                self._stalled_bytes += len(data)
                self._too_large = self._too_large or self._stalled_bytes > max_head_bytes
            else:
                self._stalled_bytes = 0
            if self._too_large:
                self._refuse()

        def _refuse(self) -> None:
            """Answer 431, then linger: closing with unread input would send a TCP reset, which
            can destroy the answer before the client reads it. With an earlier pipelined
            response still being written, there is no clean way to answer: just close."""
            self._refused = True
            log.warning("refused a request head over %d bytes from %s", max_head_bytes, self.client)
            self.pipeline.clear()
            if self.cycle is not None and not self.cycle.response_complete:
                self.transport.close()
                return
            message = f"Request line and headers larger than {max_head_bytes} bytes."
            body = json.dumps(error_body(431, message)).encode()
            head = (
                "HTTP/1.1 431 Request Header Fields Too Large\r\n"
                "content-type: application/json\r\n"
                f"content-length: {len(body)}\r\n"
                "connection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.close)

    return BoundedHeadProtocol
