"""Builds the FastAPI app: routes, error handlers, and the fleet's life with the server's."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from multiserve import __version__
from multiserve.api.errors import install_error_handlers
from multiserve.api.metrics import Metrics
from multiserve.api.routes import ServerState, router
from multiserve.config import Settings
from multiserve.fleet.manager import Fleet


def create_app(settings: Settings) -> FastAPI:
    """An app serving `settings.models`; preloaded models load before it takes requests."""
    fleet = Fleet(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await fleet.start()
        try:
            yield
        finally:
            await fleet.stop()

    app = FastAPI(title="multiserve", version=__version__, lifespan=lifespan)
    app.state.server = ServerState(settings, fleet, Metrics(fleet), time.time())
    install_error_handlers(app)
    app.include_router(router)
    return app
