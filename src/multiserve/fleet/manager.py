"""The fleet: every configured model, its state, and a single-flight start of its worker.

Concurrent requests for a cold model share one load; a worker that dies marks its model failed
and the next request starts a new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from enum import StrEnum

from multiserve.config import ModelSpec, Settings
from multiserve.engine.client import EngineClient, WorkerLoadError
from multiserve.engine.protocol import WorkerConfig

log = logging.getLogger(__name__)


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class ModelUnavailable(RuntimeError):
    """The model exists but cannot serve now; the message is safe to show a client."""


@dataclass
class ModelEntry:
    spec: ModelSpec
    state: ModelState = ModelState.UNLOADED
    client: EngineClient | None = None
    error: str | None = None
    loading: asyncio.Task[EngineClient] | None = None
    created: int = 0


class Fleet:
    """Owns every model's worker for the life of the server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        now = int(time.time())
        self.entries = {spec.id: ModelEntry(spec, created=now) for spec in settings.models}
        self._by_name = {name: spec.id for spec in settings.models for name in spec.names}

    def resolve(self, name: str) -> ModelEntry | None:
        """The model an id or alias names; None if unknown (never another model)."""
        model_id = self._by_name.get(name)
        return self.entries[model_id] if model_id is not None else None

    async def engine(self, entry: ModelEntry) -> EngineClient:
        """A running worker for this model, starting one if needed (shared by all callers)."""
        if entry.client is not None and entry.client.alive:
            return entry.client
        if entry.loading is None:
            entry.loading = asyncio.create_task(self._load(entry))
        try:
            return await asyncio.shield(entry.loading)
        except WorkerLoadError as exc:
            raise ModelUnavailable(f"model `{entry.spec.id}` failed to load: {exc}") from None

    async def _load(self, entry: ModelEntry) -> EngineClient:
        entry.state, entry.error = ModelState.LOADING, None
        client = EngineClient(self._worker_config(entry.spec), on_exit=self._on_worker_exit)
        try:
            started = time.perf_counter()
            await client.start()
            log.info("loaded %s in %.2fs", entry.spec.id, time.perf_counter() - started)
        except WorkerLoadError as exc:
            entry.state, entry.error = ModelState.FAILED, str(exc)
            log.error("model %s failed to load: %s", entry.spec.id, exc)
            raise
        finally:
            entry.loading = None
        entry.client, entry.state = client, ModelState.LOADED
        return client

    def _worker_config(self, spec: ModelSpec) -> WorkerConfig:
        return WorkerConfig(
            model_id=spec.id,
            path=spec.path,
            n_ctx_per_seq=spec.n_ctx,
            n_seq_max=spec.n_parallel,
            step_tokens=spec.step_tokens,
            threads=self.settings.threads_for(spec),
            kv_cache_type=spec.kv_cache_type,
            flash_attn=spec.flash_attn,
        )

    def _on_worker_exit(self, client: EngineClient) -> None:
        for entry in self.entries.values():
            if entry.client is client:
                entry.client = None
                if entry.state is ModelState.LOADED:  # not a requested stop
                    entry.state = ModelState.FAILED
                    entry.error = "model worker exited unexpectedly"
                    log.error("worker of %s exited unexpectedly", entry.spec.id)

    async def stop(self) -> None:
        """Stop every worker (server shutdown)."""
        clients = [e.client for e in self.entries.values() if e.client is not None]
        for entry in self.entries.values():
            entry.state, entry.client = ModelState.UNLOADED, None
        await asyncio.gather(*(client.stop() for client in clients))
