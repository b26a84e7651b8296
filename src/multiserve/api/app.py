"""Builds the FastAPI app: routes, error handlers, and the fleet's life with the server's."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from multiserve import __version__
from multiserve.api.auto import ROUTE_HEADER, build_router
from multiserve.api.errors import install_error_handlers
from multiserve.api.metrics import Metrics
from multiserve.api.openapi import publish_openapi
from multiserve.api.rate_limit import RateLimiter
from multiserve.api.routes import ServerState, misdirected, router
from multiserve.api.security import ApiKeyAuth, BodyLimit
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
    limiter = None
    if settings.requests_per_minute:
        limiter = RateLimiter(settings.requests_per_minute, settings.rate_limit_burst)
    app.state.server = ServerState(
        settings, fleet, Metrics(fleet), time.time(), limiter, build_router(settings)
    )
    install_error_handlers(app)
    app.include_router(misdirected)
    app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    keys = settings.all_api_keys()
    public = frozenset({"/health"} | ({"/metrics"} if settings.metrics_public else set()))
    if keys:
        app.add_middleware(ApiKeyAuth, keys=keys, public_paths=public)
    publish_openapi(app, protected=bool(keys), public_paths=public)
    if settings.cors_origins:  # browsers only; credentials never go with a wildcard origin
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials="*" not in settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
            expose_headers=[ROUTE_HEADER],  # so a browser client may read why `auto` chose
        )
    return app
