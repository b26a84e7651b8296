"""Runs the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

The first signal stops admitting work (new requests and /health get 503, so a load balancer
moves on) while requests in flight finish, up to `drain_timeout`. Requests still running then are
cut cleanly (503, or an error event and `[DONE]` in a stream) and uvicorn shuts down, which stops
every worker. A second signal cuts them at once; a third stops without waiting for anything.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from multiserve.api.http_protocol import ConnectionLimits, limited_protocol
from multiserve.config import ConfigError, Settings

log = logging.getLogger(__name__)
DRAIN_POLL_SECONDS = 0.1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self._state = app.state.server
        self._drain_timeout = drain_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Not uvicorn's: it would raise the signal again after shutdown (a KeyboardInterrupt
        traceback on Ctrl-C)."""
        if self.should_exit:  # third signal: leave without waiting for connections
            self.force_exit = True
        elif self._state.draining:  # second signal: cut what runs and stop now
            asyncio.get_event_loop().call_soon_threadsafe(self._cut, "second signal")
        else:
            self._state.draining = True
            log.info(
                "draining: refusing new requests, finishing %d in flight (up to %gs; "
                "Ctrl-C again to stop now)",
                self._in_flight(),
                self._drain_timeout,
            )
            asyncio.get_event_loop().call_soon_threadsafe(asyncio.ensure_future, self._drain())

    def _in_flight(self) -> int:
        return sum(e.admission.in_system for e in self._state.fleet.entries.values())

    def _cut(self, why: str) -> None:
        if in_flight := self._in_flight():
            log.warning("%s: cutting %d requests still in flight", why, in_flight)
        self._state.fleet.cut_all()
        self.should_exit = True

    async def _drain(self) -> None:
        deadline = time.monotonic() + self._drain_timeout
        while self._in_flight() and time.monotonic() < deadline and not self.should_exit:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        if not self.should_exit:
            self._cut("drain timeout")


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything slow starts, so a busy port is said at once
    (uvicorn would find it only after the models had loaded)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = (
            ": another server (perhaps another multiserve) uses it; stop it or choose another "
            "port with --port"
            if exc.errno == errno.EADDRINUSE
            else f": {exc.strerror}"
        )
        raise ConfigError(f"cannot listen on {host}:{port}{hint}") from None
    return sock


def serve(app: FastAPI, settings: Settings, sock: socket.socket) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
        http=limited_protocol(
            ConnectionLimits(
                settings.max_header_bytes, settings.header_timeout, settings.max_connections
            )
        ),
    )
    DrainingServer(config, app, settings.drain_timeout).run(sockets=[sock])
