"""HTTP/1.1 over raw loopback sockets, for bursts that must measure the server, not the client.

An HTTP library spends tens of microseconds to milliseconds of its own CPU per request; with 60
or 200 requests sent at once from one event loop, that queueing lands in every latency the burst
measures. Here a request is bytes built beforehand, written on a connection opened beforehand,
and its whole answer read until the server closes (`Connection: close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from benchmarks.common.servers import HOST

_USAGE_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


@dataclass
class RawReply:
    """One answer as read off the socket; times are perf_counter seconds."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    t_send: float = 0.0
    t_end: float = 0.0

    @property
    def seconds(self) -> float:
        return self.t_end - self.t_send

    def error_code(self) -> str | None:
        """The `error.code` of an OpenAI error body, if the body is one."""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return json.loads(self.body)["error"]["code"]
        return None

    def streamed_tokens(self) -> int | None:
        """A complete event stream's usage `completion_tokens` (None if the stream did not end
        with `data: [DONE]` or carried no usage)."""
        usage = _USAGE_TOKENS.findall(self.body)
        return int(usage[-1]) if usage and b"data: [DONE]" in self.body else None


def request_bytes(method: str, path: str, body: dict[str, object] | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
    payload = json.dumps(body).encode() if body is not None else b""
    if payload:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    return head.encode() + b"\r\n" + payload


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def connections(port: int, n: int) -> AsyncIterator[list[Connection]]:
    """`n` open connections to HOST:port, closed on exit."""
    opened: list[Connection] = []
    try:
        for _ in range(n):
            opened.append(await asyncio.open_connection(HOST, port))
        yield opened
    finally:
        for _, writer in opened:
            writer.close()


async def exchange(connection: Connection, request: bytes) -> RawReply:
    """Write `request` and read the whole answer; timed from the write to the server's close."""
    reader, writer = connection
    t_send = time.perf_counter()
    writer.write(request)
    raw = await reader.read(-1)
    t_end = time.perf_counter()
    status, headers, body = _parse(raw)
    return RawReply(status, headers, body, t_send, t_end)


async def raw_request(
    port: int, method: str, path: str, body: dict[str, object] | None = None
) -> RawReply:
    """One request on a fresh connection."""
    async with connections(port, 1) as (connection,):
        return await exchange(connection, request_bytes(method, path, body))
