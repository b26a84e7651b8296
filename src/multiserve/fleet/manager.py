"""The fleet: every configured model, its state, and getting requests to a running worker.

Loads are lazy and single-flight (concurrent requests for a cold model share one load), checked
against a memory budget with least-recently-used eviction of idle models, and isolated: a worker
that dies marks only its model failed, with a back-off before the next load try. Idle models
unload after their TTL; pinned ones never leave.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import psutil

from multiserve.config import ModelSpec, Settings, parse_budget
from multiserve.engine.client import EngineClient, WorkerLoadError, WorkerProcess
from multiserve.engine.lease import ComputeLease
from multiserve.engine.protocol import WorkerConfig
from multiserve.fleet.admission import Admission, Ticket
from multiserve.fleet.gguf_header import GGUFError, read_header
from multiserve.fleet.memory import MemoryEstimate, estimate_memory, format_bytes

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0
SPARE_DELAY_SECONDS = 3.0
TTL_CHECK_SECONDS = 1.0


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class ModelUnavailable(RuntimeError):
    """The model exists but cannot serve now; the message is safe to show a client."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelBusy(RuntimeError):
    """An unload was asked of a model with requests in flight."""


@dataclass
class ModelEntry:
    spec: ModelSpec
    admission: Admission
    state: ModelState = ModelState.UNLOADED
    client: EngineClient | None = None
    error: str | None = None
    estimate: MemoryEstimate | None = None
    estimated_for: tuple[int, int] | None = None  # (size, mtime) of the file estimated
    loading: asyncio.Task[EngineClient] | None = None
    draining: bool = False
    failures: int = 0
    loads: int = 0
    retry_at: float = 0.0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def busy(self) -> bool:
        return self.admission.in_system > 0

    @property
    def holds_memory(self) -> bool:
        return self.state in (ModelState.LOADED, ModelState.LOADING)


class Fleet:
    """Owns every model's worker for the life of the server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.budget = parse_budget(settings.memory_budget, psutil.virtual_memory().available)
        self.entries = {
            spec.id: ModelEntry(spec, Admission(spec.n_parallel, spec.queue_limit))
            for spec in settings.models
        }
        self._by_name = {name: spec.id for spec in settings.models for name in spec.names}
        self._lease = ComputeLease(mp.get_context("spawn")) if settings.share_cores else None
        self._memory_lock = asyncio.Lock()
        self._spare: WorkerProcess | None = None
        self._spare_timer: asyncio.TimerHandle | None = None
        self._reaper: asyncio.Task[None] | None = None

    # -- lookups -----------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelEntry | None:
        """The model an id or alias names; None if unknown (never another model)."""
        model_id = self._by_name.get(name)
        return self.entries[model_id] if model_id is not None else None

    def reserved_bytes(self, excluding: ModelEntry | None = None) -> int:
        return sum(
            e.estimate.total
            for e in self.entries.values()
            if e.holds_memory and e.estimate is not None and e is not excluding
        )

    # -- life of the server ------------------------------------------------------------------

    async def start(self) -> None:
        """Report missing files, start the spare worker and TTL reaper, preload models."""
        for entry in self.entries.values():
            if not entry.spec.path.is_file():
                entry.state, entry.error = ModelState.FAILED, "model file not found"
                log.error("model %s: file not found: %s", entry.spec.id, entry.spec.path)
        self._spare = self._new_worker()
        self._reaper = asyncio.create_task(self._reap_idle())
        for entry in self.entries.values():
            if entry.spec.preload and entry.state is not ModelState.FAILED:
                try:
                    await self.engine(entry)
                except ModelUnavailable as exc:  # the others still serve; /health shows it
                    log.error("preload of %s skipped: %s", entry.spec.id, exc)

    async def stop(self) -> None:
        """Stop every worker (server shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
        if self._spare_timer is not None:
            self._spare_timer.cancel()
        if self._spare is not None:
            self._spare.discard()
            self._spare = None
        await asyncio.gather(*(self._stop_worker(e) for e in self.entries.values()))

    # -- requests ----------------------------------------------------------------------------

    def admit(self, entry: ModelEntry) -> Ticket:
        """Reserve a place for one request (raises Overloaded when the queue is full)."""
        if entry.draining:
            raise ModelUnavailable(f"model `{entry.spec.id}` is being unloaded", retry_after=5)
        return entry.admission.enter()

    async def engine(self, entry: ModelEntry) -> EngineClient:
        """A running worker for this model, starting one if needed (shared by all callers)."""
        if entry.client is not None and entry.client.alive:
            return entry.client
        if entry.loading is None:
            if entry.state is ModelState.FAILED and entry.retry_at > time.monotonic():
                raise ModelUnavailable(
                    f"model `{entry.spec.id}` is unavailable ({entry.error}); next load attempt "
                    f"in {self._backoff(entry)}s",
                    retry_after=self._backoff(entry),
                )
            entry.loading = asyncio.create_task(self._load(entry))
        return await asyncio.shield(entry.loading)

    # -- loading and unloading ---------------------------------------------------------------

    async def _load(self, entry: ModelEntry) -> EngineClient:
        spec = entry.spec
        try:
            async with self._memory_lock:
                estimate = await self._estimate(entry)
                await self._make_room(entry, estimate.total)
                entry.estimate, entry.state, entry.error = estimate, ModelState.LOADING, None
            config = self._worker_config(spec, estimate.host_cache)
            client = EngineClient(config, self._on_worker_exit)
            started = time.perf_counter()
            spare, self._spare = self._spare, None
            if spare is None or not spare.process.is_alive():
                spare = self._new_worker()
            try:
                await asyncio.wait_for(client.start(spare), self.settings.load_timeout)
            except TimeoutError:
                await client.stop()
                raise WorkerLoadError("loading took too long") from None
            finally:
                self._replenish_spare()
            log.info("loaded %s in %.2fs", spec.id, time.perf_counter() - started)
        except WorkerLoadError as exc:
            self._mark_failed(entry, f"failed to load: {exc}")
            raise ModelUnavailable(
                f"model `{spec.id}` {entry.error}", self._backoff(entry)
            ) from None
        finally:
            entry.loading = None
        entry.client, entry.state, entry.failures = client, ModelState.LOADED, 0
        entry.loads += 1
        return client

    def _replenish_spare(self) -> None:
        """Start the next spare a little later: booting it now would take CPU from the model
        that was just loaded, at the moment its first requests need it most."""
        if self._spare is None and self._spare_timer is None:
            self._spare_timer = asyncio.get_running_loop().call_later(
                SPARE_DELAY_SECONDS, self._start_spare
            )

    def _start_spare(self) -> None:
        self._spare_timer = None
        if self._spare is None:
            self._spare = self._new_worker()

    def _new_worker(self) -> WorkerProcess:
        return WorkerProcess(self._lease, self.settings.worker_nice)

    async def _estimate(self, entry: ModelEntry) -> MemoryEstimate:
        stat_key = _file_key(entry.spec.path)
        if entry.estimate is not None and stat_key is not None and stat_key == entry.estimated_for:
            return entry.estimate  # the same file as last time: no need to parse it again
        try:
            header = await asyncio.to_thread(read_header, entry.spec.path)
        except FileNotFoundError:
            self._mark_failed(entry, "model file not found")
        except GGUFError as exc:
            self._mark_failed(entry, f"is not a valid GGUF file: {exc}")
        except OSError as exc:
            self._mark_failed(entry, f"model file cannot be read ({exc.strerror})")
        else:
            entry.estimated_for = stat_key
            return estimate_memory(header, entry.spec)
        raise ModelUnavailable(f"model `{entry.spec.id}` {entry.error}", self._backoff(entry))

    async def _make_room(self, entry: ModelEntry, needed: int) -> None:
        """Evict idle, unpinned models, least recently used first, until `needed` bytes fit."""
        limit = self.settings.max_loaded_models
        while True:
            holding = [e for e in self.entries.values() if e.holds_memory and e is not entry]
            free = self.budget - self.reserved_bytes(excluding=entry)
            if needed <= free and (limit is None or len(holding) < limit):
                return
            idle = [
                e
                for e in holding
                if e.state is ModelState.LOADED and not e.busy and not e.spec.pinned
            ]
            if not idle:
                reason = (
                    f"needs {format_bytes(needed)}, {format_bytes(max(free, 0))} available "
                    f"within the memory budget of {format_bytes(self.budget)}"
                    if needed > free
                    else f"{limit} models are loaded and busy or pinned"
                )
                raise ModelUnavailable(
                    f"model `{entry.spec.id}` cannot be loaded now: {reason}", retry_after=10
                )
            victim = min(idle, key=lambda e: e.admission.last_used)
            log.info("evicting %s to make room for %s", victim.spec.id, entry.spec.id)
            await self._stop_worker(victim)

    @staticmethod
    def _backoff(entry: ModelEntry) -> int:
        """Seconds until the next load attempt of a failed model."""
        return max(1, round(entry.retry_at - time.monotonic()))

    def _mark_failed(self, entry: ModelEntry, error: str) -> None:
        entry.state, entry.error, entry.client = ModelState.FAILED, error, None
        entry.failures += 1
        entry.retry_at = time.monotonic() + min(MAX_BACKOFF_SECONDS, 2.0 ** (entry.failures - 1))
        log.error("model %s %s", entry.spec.id, error)

    async def unload(self, entry: ModelEntry, wait: bool) -> None:
        """Unload now, or (with `wait`) refuse new requests and let in-flight ones finish."""
        if entry.busy and not wait:
            raise ModelBusy(
                f"model `{entry.spec.id}` has {entry.admission.in_system} requests in flight"
            )
        entry.draining = True
        try:
            while entry.busy:
                await asyncio.sleep(0.05)
            await self._stop_worker(entry)
        finally:
            entry.draining = False

    async def _stop_worker(self, entry: ModelEntry) -> None:
        client = entry.client
        entry.client, entry.state = None, ModelState.UNLOADED
        if client is not None:
            await client.stop()

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(TTL_CHECK_SECONDS)
            now = time.monotonic()
            for entry in self.entries.values():
                ttl = entry.spec.idle_ttl
                if (
                    ttl is not None
                    and entry.state is ModelState.LOADED
                    and not entry.busy
                    and not entry.spec.pinned
                    and now - entry.admission.last_used > ttl
                ):
                    log.info("unloading %s after %.0fs idle", entry.spec.id, ttl)
                    await self._stop_worker(entry)

    def _worker_config(self, spec: ModelSpec, host_cache_bytes: int) -> WorkerConfig:
        return WorkerConfig(
            model_id=spec.id,
            path=spec.path,
            n_ctx_per_seq=spec.n_ctx,
            n_seq_max=spec.n_parallel,
            step_tokens=spec.step_tokens,
            threads=self.settings.threads_for(spec),
            kv_cache_type=spec.kv_cache_type,
            flash_attn=spec.flash_attn,
            swa_full=spec.swa_full,
            prefix_cache=spec.prefix_cache,
            host_cache_bytes=host_cache_bytes,
        )

    def _on_worker_exit(self, client: EngineClient) -> None:
        for entry in self.entries.values():
            if entry.client is client:  # not a stop we asked for: those clear entry.client first
                self._mark_failed(entry, "worker exited unexpectedly")
