"""Runs the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

The first signal stops admitting work (new requests and /health get 503, so a load balancer
moves on) while requests in flight finish, up to `drain_timeout`; then uvicorn shuts down, which
stops every worker. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from multiserve.api.http_protocol import ConnectionLimits, limited_protocol
from multiserve.config import Settings

log = logging.getLogger(__name__)
DRAIN_POLL_SECONDS = 0.1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self._state = app.state.server
        self._drain_timeout = drain_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._state.draining:  # second signal: stop now
            super().handle_exit(sig, frame)
            return
        self._state.draining = True
        log.info("draining: refusing new requests, finishing %d in flight", self._in_flight())
        asyncio.get_event_loop().create_task(self._drain())

    def _in_flight(self) -> int:
        return sum(e.admission.in_system for e in self._state.fleet.entries.values())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self._drain_timeout
        while self._in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        if self._in_flight():
            log.warning("drain timeout: %d requests still in flight are cut off", self._in_flight())
        self.should_exit = True


def serve(app: FastAPI, settings: Settings) -> None:
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
    DrainingServer(config, app, settings.drain_timeout).run()
