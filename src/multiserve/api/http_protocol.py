"""uvicorn's httptools protocol with a cap on the request head (request line plus headers).

llhttp, under httptools, sets no limit: a client could make the server buffer gigabytes of header
before the app sees anything. Counting the bytes fed while a head is still incomplete bounds that
memory to the limit plus one socket read; over it, the client gets a 431 and the connection closes.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from multiserve.api.errors import error_body

LINGER_SECONDS = 2.0  # how long a refused client may go on sending before the socket closes


def bounded_head_protocol(max_head_bytes: int) -> type[HttpToolsProtocol]:
    """The protocol class to give `uvicorn.Config(http=...)`."""

    class BoundedHeadProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_bytes = 0
            self._heads_complete = 0
            self._in_head = True
            self._refused = False
            super().connection_made(transport)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            self._heads_complete += 1
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True  # whatever comes next on this connection is a new head
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # lingering after a 431: the rest of the oversized head is dropped
            heads_before = self._heads_complete
            in_head_before = self._in_head
            super().data_received(data)
            # every byte of this read belonged to the same unfinished head
            if in_head_before and self._in_head and self._heads_complete == heads_before:
                self._head_bytes += len(data)
                if self._head_bytes > max_head_bytes and not self.transport.is_closing():
                    self._refuse()

        def _refuse(self) -> None:
            """Answer 431, then linger: closing with unread input would send a TCP reset, which
            can destroy the answer before the client reads it."""
            self._refused = True
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
