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
        """Two counts: the head as the parser hands it over (a head that arrives whole in one
        read), and raw bytes read while a head is unfinished (one endless header line, which the
        parser buffers without a callback until it ends)."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._parsed_head = 0
            self._unfinished_head = 0
            self._heads_complete = 0
            self._in_head = True
            self._too_large = False
            super().connection_made(transport)

        def on_message_begin(self) -> None:
            self._parsed_head = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count_parsed(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_parsed(len(name) + len(value) + 4)  # ": " and CRLF
            super().on_header(name, value)

        def _count_parsed(self, size: int) -> None:
            self._parsed_head += size
            if self._parsed_head > max_head_bytes:
                self._too_large = True
                raise _HeadTooLarge  # stops the parser; uvicorn answers via send_400_response

        def send_400_response(self, msg: str) -> None:
            if self._too_large:
                self._refuse()
            else:
                super().send_400_response(msg)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._unfinished_head = 0
            self._heads_complete += 1
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True  # whatever comes next on this connection is a new head
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self._too_large:
                return  # lingering after a 431: the rest of the oversized head is dropped
            heads_before = self._heads_complete
            in_head_before = self._in_head
            super().data_received(data)
            # every byte of this read belonged to the same unfinished head
            if in_head_before and self._in_head and self._heads_complete == heads_before:
                self._unfinished_head += len(data)
                if self._unfinished_head > max_head_bytes and not self._too_large:
                    self._too_large = True
                    self._refuse()

        def _refuse(self) -> None:
            """Answer 431, then linger: closing with unread input would send a TCP reset, which
            can destroy the answer before the client reads it."""
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


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing an oversized head."""
