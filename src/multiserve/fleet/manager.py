"""The fleet: every configured model, its state, and getting requests to a running worker.

Loads are lazy and single-flight (concurrent requests for a cold model share one load), checked
against a memory budget, and isolated: a worker that dies marks only its model failed, with a
back-off before the next load try. Idle models unload after their TTL; pinned ones never leave.

A load that does not fit waits for room, in arrival order with other loads, for as long as one of
its requests still waits: the least recently used idle model is evicted at once; when only busy
models hold the memory, the one loaded longest gives way once it has had its turn (`model_turn`
seconds loaded): it takes no new requests (they wait to load it again), finishes those it has,
and is unloaded. Models just used are not idle for a moment's gap between a client's requests,
so concurrent traffic over more models than fit swaps models once a turn, not once a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from multiserve.backends import Backend, make_backend
from multiserve.backends.client import RequestCut, Reservation, RunningModel, WorkerLoadError
from multiserve.config import ModelSpec, Settings
from multiserve.engine.protocol import WorkerConfig
from multiserve.fleet.admission import Admission, Ticket
from multiserve.fleet.gguf_header import GGUFError
from multiserve.fleet.memory import MemoryEstimate, estimate_memory, format_bytes

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0
TOO_LARGE_RETRY_SECONDS = 30  # a cluster too small for a model may gain a node meanwhile
WATCH_SECONDS = 1.0
IDLE_GRACE_SECONDS = 1.0  # a model idle for less, within its turn, is between a client's requests
ROOM_POLL_SECONDS = 0.25  # a load waiting for room looks again this often (turns end in time)


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


class ModelTooLarge(RuntimeError):
    """The model cannot fit: retrying will not help, unless `retry_after` is set (a cluster
    may gain a node big enough). Safe to show a client."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelBusy(RuntimeError):
    """An unload was asked of a model with requests in flight."""


@dataclass
class ModelEntry:
    spec: ModelSpec
    admission: Admission
    state: ModelState = ModelState.UNLOADED
    client: RunningModel | None = None
    reservation: Reservation | None = None  # its place, memory and threads, while it holds any
    error: str | None = None
    estimate: MemoryEstimate | None = None
    estimated_for: tuple[int, int] | None = None  # (size, mtime) of the file estimated
    loading: asyncio.Task[RunningModel] | None = None
    restoring: asyncio.Task[None] | None = None  # placing a lost replica again
    unloading: bool = False  # unload with ?wait=true: new requests refused, in-flight finish
    yielding: bool = False  # giving its memory to a waiting model: takes no new requests
    too_large: bool = False  # needs more memory than any place has
    waiters: int = 0  # callers waiting for this model's worker (a load, or its turn again)
    loaded_at: float = 0.0
    failures: int = 0
    loads: int = 0
    retry_at: float = 0.0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def busy(self) -> bool:
        return self.admission.in_system > 0

    @property
    def on_worker(self) -> int:
        """Requests the worker has now (those admitted but still waiting for it not counted)."""
        return self.client.in_flight if self.client is not None else 0

    @property
    def holds_memory(self) -> bool:
        return self.state in (ModelState.LOADED, ModelState.LOADING)


class Fleet:
    """Owns every model's worker for the life of the server."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend = backend or make_backend(settings)
        self.entries = {
            spec.id: ModelEntry(spec, Admission(spec.n_parallel, spec.queue_limit, self._changed))
            for spec in settings.models
        }
        self._by_name = {name: spec.id for spec in settings.models for name in spec.names}
        self._memory_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._change = asyncio.Event()  # set (and replaced) whenever a wait for room may end
        self.closing = False

    # -- lookups -----------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelEntry | None:
        """The model an id or alias names; None if unknown (never another model)."""
        model_id = self._by_name.get(name)
        return self.entries[model_id] if model_id is not None else None

    def held(self, entries: list[ModelEntry] | None = None) -> list[Reservation]:
        """What `entries` (default: every model) hold where they are loaded or loading."""
        chosen = self.entries.values() if entries is None else entries
        return [e.reservation for e in chosen if e.holds_memory and e.reservation is not None]

    def memory(self) -> dict:
        """`/stats` memory: what the backend has and what models reserve of it."""
        return self.backend.memory(self.held())

    # -- life of the server ------------------------------------------------------------------

    def failed(self) -> dict[str, str]:
        """Models that cannot serve now, with why."""
        return {
            model_id: entry.error or "failed"
            for model_id, entry in self.entries.items()
            if entry.state is ModelState.FAILED
        }

    async def start(self) -> None:
        """Start the backend, check every model's file and size, start the TTL reaper, preload."""
        await self.backend.start()
        for entry in self.entries.values():
            try:  # a model that fails here is marked failed and logged; the others still serve
                await self._estimate(entry)
            except ModelUnavailable:
                entry.retry_at, entry.failures = 0.0, 0  # the first request looks again
            except ModelTooLarge:
                pass
        self._watcher = asyncio.create_task(self._watch())
        for entry in self.entries.values():
            if entry.spec.preload and entry.state is not ModelState.FAILED:
                try:
                    await self.engine(entry)
                except (ModelUnavailable, ModelTooLarge) as exc:
                    log.error("preload of %s skipped: %s", entry.spec.id, exc)

    def cut_all(self) -> None:
        """Shutdown, past its drain time: end every request now, waiting or running."""
        self.closing = True
        for entry in self.entries.values():
            if entry.client is not None:
                entry.client.cut_all()
            if entry.loading is not None:  # its waiters get RequestCut
                entry.loading.cancel()
        self._changed()

    async def stop(self) -> None:
        """Stop every worker (server shutdown)."""
        if self._watcher is not None:
            self._watcher.cancel()
        await asyncio.gather(*(self._stop_worker(e) for e in self.entries.values()))
        await self.backend.stop()

    # -- requests ----------------------------------------------------------------------------

    def admit(self, entry: ModelEntry, places: int = 1) -> Ticket:
        """Reserve places for a request's prompts (raises Overloaded when the queue is full)."""
        if entry.unloading:
            raise ModelUnavailable(f"model `{entry.spec.id}` is being unloaded", retry_after=5)
        return entry.admission.enter(places)

    def ready(self, entry: ModelEntry) -> RunningModel | None:
        """The model's worker if it takes requests now (the common case: no waiting at all)."""
        client = entry.client
        if client is not None and client.alive and not entry.yielding and not self.closing:
            return client
        return None

    def can_serve(self, entry: ModelEntry) -> bool:
        """Whether a request for this model could be served, now or after a load: not too large
        for the budget, not being unloaded, not failed and waiting out its retry backoff."""
        failed = entry.state is ModelState.FAILED and entry.retry_at > time.monotonic()
        too_large = entry.too_large and self._still_too_large(entry)
        return not (too_large or entry.unloading or failed)

    async def engine(self, entry: ModelEntry) -> RunningModel:
        """A running worker for this model, starting one if needed (shared by all callers).

        Waits while the model gives its memory to another and, for room, as long as the caller
        does; raises ModelUnavailable, ModelTooLarge, or RequestCut at shutdown."""
        if (client := self.ready(entry)) is not None:
            return client
        entry.waiters += 1
        try:
            while True:
                if self.closing:
                    raise RequestCut("the server is shutting down")
                if (client := self.ready(entry)) is not None:
                    return client
                if entry.too_large and self._still_too_large(entry):
                    raise self._too_large(f"model `{entry.spec.id}` {entry.error}")
                if entry.yielding:  # wait for it to be unloaded, then load it again
                    await self._wait_for_change()
                    continue
                if entry.loading is None:
                    if entry.state is ModelState.FAILED and entry.retry_at > time.monotonic():
                        raise ModelUnavailable(
                            f"model `{entry.spec.id}` is unavailable ({entry.error}); next load "
                            f"attempt in {self._backoff(entry)}s",
                            retry_after=self._backoff(entry),
                        )
                    entry.loading = asyncio.create_task(self._load(entry))
                    entry.loading.add_done_callback(_retrieve_exception)
                try:
                    return await asyncio.shield(entry.loading)
                except asyncio.CancelledError:
                    if self.closing and not asyncio.current_task().cancelling():
                        raise RequestCut("the server is shutting down") from None
                    raise  # our caller gave up
        finally:
            entry.waiters -= 1
            self._changed()

    def _changed(self) -> None:
        """Wake every wait for room or for a model's turn: something they wait on may be over."""
        self._change.set()
        self._change = asyncio.Event()

    async def _wait_for_change(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._change.wait(), ROOM_POLL_SECONDS)

    # -- loading and unloading ---------------------------------------------------------------

    async def _load(self, entry: ModelEntry) -> RunningModel:
        spec = entry.spec
        try:
            async with self._memory_lock:
                estimate = await self._estimate(entry)
                reservation = await self._make_room(entry, estimate.total)
                entry.estimate, entry.state, entry.error = estimate, ModelState.LOADING, None
                entry.reservation = reservation
            config = worker_config(spec, reservation.threads, estimate.host_cache)
            started = time.perf_counter()
            client = await self._start_client(config, reservation)
            if not client.alive:  # exited between its answer and now
                await client.stop()
                raise WorkerLoadError(
                    f"model worker exited right after loading ({client.exit_reason})"
                )
            log.info(
                "loaded %s on %s in %.2fs",
                spec.id,
                ", ".join(place.node for place in reservation.placements),
                time.perf_counter() - started,
            )
        except WorkerLoadError as exc:
            self._mark_failed(entry, f"failed to load: {exc}")
            raise ModelUnavailable(
                f"model `{spec.id}` {entry.error}", self._backoff(entry)
            ) from None
        finally:
            entry.loading = None
        entry.client, entry.state, entry.failures = client, ModelState.LOADED, 0
        entry.loaded_at = time.monotonic()
        entry.loads += 1
        self._changed()
        return client

    async def _start_client(self, config: WorkerConfig, reservation: Reservation) -> RunningModel:
        """A started worker for `config`; one that fails, times out or is given up on is
        stopped (a Ray actor left behind would hold its node's memory)."""
        client = self.backend.client(config, reservation, self._on_worker_exit)
        try:
            await asyncio.wait_for(client.start(), self.settings.load_timeout)
        except TimeoutError:
            await client.stop()
            raise WorkerLoadError("loading took too long") from None
        except BaseException:
            await client.stop()
            raise
        return client

    async def _estimate(self, entry: ModelEntry) -> MemoryEstimate:
        stat_key = _file_key(entry.spec.path)
        if entry.estimate is not None and stat_key is not None and stat_key == entry.estimated_for:
            return entry.estimate  # the same file as last time: no need to parse it again
        try:
            header = await self.backend.read_header(entry.spec.path)
        except FileNotFoundError:
            self._mark_failed(entry, self.backend.missing_file)
        except GGUFError as exc:
            self._mark_failed(entry, f"is not a valid GGUF file: {exc}")
        except OSError as exc:
            self._mark_failed(entry, f"model file cannot be read ({exc.strerror})")
        else:
            estimate = estimate_memory(header, entry.spec)
            entry.estimate, entry.estimated_for = estimate, stat_key
            if (why := self.backend.too_large(entry.spec, estimate.total)) is not None:
                entry.too_large = True
                self._mark_failed(
                    entry,
                    f"needs {format_bytes(estimate.total)} of memory, {why}, or lower its "
                    "n_ctx, n_parallel or kv_cache_type",
                )
                raise self._too_large(f"model `{entry.spec.id}` {entry.error}")
            entry.too_large = False
            return estimate
        raise ModelUnavailable(f"model `{entry.spec.id}` {entry.error}", self._backoff(entry))

    async def _make_room(self, entry: ModelEntry, needed: int) -> Reservation:
        """Evict or wait until `needed` bytes fit somewhere (see the module's docstring for the
        order); the place they fit."""
        limit = self.settings.max_loaded_models
        giving_way: ModelEntry | None = None
        try:
            while True:
                if self.closing:
                    raise RequestCut("the server is shutting down")
                if entry.waiters == 0:
                    raise ModelUnavailable(f"nobody waits for model `{entry.spec.id}` any more")
                holding = [e for e in self.entries.values() if e.holds_memory and e is not entry]
                place = self.backend.place(entry.spec, needed, self.held(holding))
                if place is not None and (limit is None or len(holding) < limit):
                    return place
                self._check_can_fit(entry, needed, holding)
                now = time.monotonic()
                movable = [e for e in holding if e.state is ModelState.LOADED and not e.spec.pinned]
                idle = [
                    e
                    for e in movable
                    if (e.yielding and e.on_worker == 0)
                    or (not e.busy and (self._turn_over(e, now) or self._past_idle_grace(e, now)))
                ]
                if idle:
                    # on a cluster, a victim whose node then has room beats an older one elsewhere
                    frees = [
                        e
                        for e in idle
                        if self.backend.place(
                            entry.spec, needed, self.held([h for h in holding if h is not e])
                        )
                        is not None
                    ]
                    victim = min(frees or idle, key=lambda e: e.admission.last_used)
                    log.info("evicting %s to make room for %s", victim.spec.id, entry.spec.id)
                    await self._stop_worker(victim)
                    continue
                turn_over = [e for e in movable if self._turn_over(e, now)]
                if giving_way is None and turn_over:
                    giving_way = min(turn_over, key=lambda e: e.loaded_at)
                    giving_way.yielding = True
                    log.info(
                        "%s gives way to %s after its turn: finishing %d requests",
                        giving_way.spec.id,
                        entry.spec.id,
                        giving_way.on_worker,
                    )
                await self._wait_for_change()
        finally:
            if giving_way is not None and giving_way.yielding:  # not unloaded after all
                giving_way.yielding = False
                self._changed()

    def _check_can_fit(self, entry: ModelEntry, needed: int, holding: list[ModelEntry]) -> None:
        """Raise ModelTooLarge if no eviction can ever make room (pinned models stay)."""
        pinned = [e for e in holding if e.spec.pinned]
        limit = self.settings.max_loaded_models
        if self.backend.place(entry.spec, needed, self.held(pinned)) is None or (
            limit is not None and len(pinned) >= limit
        ):
            raise self._too_large(
                f"model `{entry.spec.id}` cannot be loaded beside the pinned models "
                f"({', '.join(e.spec.id for e in pinned)}): it needs {format_bytes(needed)}, "
                "more than is left beside them"
            )

    def _still_too_large(self, entry: ModelEntry) -> bool:
        """Whether a model found too large still is (a Ray cluster may have gained a node)."""
        if self.backend.fixed_size or entry.estimate is None:
            return True
        entry.too_large = self.backend.too_large(entry.spec, entry.estimate.total) is not None
        return entry.too_large

    def _too_large(self, message: str) -> ModelTooLarge:
        return ModelTooLarge(message, None if self.backend.fixed_size else TOO_LARGE_RETRY_SECONDS)

    def _turn_over(self, entry: ModelEntry, now: float) -> bool:
        return now - entry.loaded_at >= self.settings.model_turn

    @staticmethod
    def _past_idle_grace(entry: ModelEntry, now: float) -> bool:
        return now - entry.admission.last_used >= IDLE_GRACE_SECONDS

    @staticmethod
    def _backoff(entry: ModelEntry) -> int:
        """Seconds until the next load attempt of a failed model."""
        return max(1, round(entry.retry_at - time.monotonic()))

    def _mark_failed(self, entry: ModelEntry, error: str) -> None:
        entry.state, entry.error, entry.client = ModelState.FAILED, error, None
        entry.reservation = None
        entry.failures += 1
        entry.retry_at = time.monotonic() + min(MAX_BACKOFF_SECONDS, 2.0 ** (entry.failures - 1))
        log.error("model %s %s", entry.spec.id, error)

    async def unload(self, entry: ModelEntry, wait: bool) -> None:
        """Unload now, or (with `wait`) refuse new requests and let in-flight ones finish.

        A load under way (`POST /load`, no request waiting) is let finish, then stopped: its
        worker only gets its client at the end, so stopping earlier would miss it."""
        if entry.busy and not wait:
            raise ModelBusy(
                f"model `{entry.spec.id}` has {entry.admission.in_system} requests in flight"
            )
        entry.unloading = True
        try:
            while entry.busy or entry.loading is not None:
                if entry.loading is not None:
                    await asyncio.wait({entry.loading})
                else:
                    await asyncio.sleep(0.05)
            await self._stop_worker(entry)
        finally:
            entry.unloading = False

    async def _stop_worker(self, entry: ModelEntry) -> None:
        client = entry.client
        entry.client, entry.state, entry.yielding = None, ModelState.UNLOADED, False
        entry.reservation = None
        if client is not None:
            await client.stop()
        self._changed()

    async def _watch(self) -> None:
        """Every second: kill hung workers, unload models idle past their TTL. A failure with
        one model is logged and the watch goes on (it guards every other model too)."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            for entry in self.entries.values():
                try:
                    await self._look_after(entry, time.monotonic())
                except Exception:
                    log.exception("model %s: the watch failed this time", entry.spec.id)

    async def _look_after(self, entry: ModelEntry, now: float) -> None:
        client = entry.client
        if client is not None and client.alive and entry.restoring is None and client.lost():
            entry.restoring = asyncio.create_task(self._restore(entry, client))
        if client is not None and client.alive:
            silent = client.stalled(entry.spec.stall_timeout)
            if silent is not None:
                log.error(
                    "model %s: no step for %.0fs with %d requests: killing its worker",
                    entry.spec.id,
                    silent,
                    client.in_flight,
                )
                client.kill(silent)
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

    async def _restore(self, entry: ModelEntry, client: RunningModel) -> None:
        """Place one lost replica again, on a node none of the others is on (no room now: the
        next watch tries again)."""
        try:
            async with self._memory_lock:
                lost, res = client.lost(), entry.reservation
                if not lost or res is None or entry.client is not client:
                    return
                living = [p for i, p in enumerate(res.placements) if i not in lost]
                held = self.held([e for e in self.entries.values() if e is not entry])
                held.append(Reservation(tuple(living), res.memory, res.threads))
                one = entry.spec.model_copy(update={"replicas": 1, "threads": res.threads})
                avoid = frozenset(p.node_id for p in living)
                spot = self.backend.place(one, res.memory, held, avoid)
                if spot is None:
                    return
                places = list(res.placements)
                places[lost[0]] = spot.placements[0]
                entry.reservation = Reservation(tuple(places), res.memory, res.threads)
            await client.restore(lost[0], spot.placements[0])
        except Exception:  # the next watch tries again
            log.exception("model %s: placing a lost replica again failed", entry.spec.id)
        finally:
            entry.restoring = None

    def _on_worker_exit(self, client: RunningModel) -> None:
        for entry in self.entries.values():
            if entry.client is client:  # not a stop we asked for: those clear entry.client first
                entry.yielding = False
                why = f"worker exited unexpectedly ({client.exit_reason})"
                if client.stalled_for is not None:
                    why = f"worker hung (no step for {client.stalled_for:.0f}s) and was killed"
                self._mark_failed(entry, why)
                self._changed()


def worker_config(spec: ModelSpec, threads: int, host_cache_bytes: int = 0) -> WorkerConfig:
    """What a worker needs to run `spec` (the benchmarks' anchors build theirs here too)."""
    return WorkerConfig(
        model_id=spec.id,
        path=spec.path,
        n_ctx_per_seq=spec.n_ctx,
        n_seq_max=spec.n_parallel,
        step_tokens=spec.step_tokens,
        threads=threads,
        kv_cache_type=spec.kv_cache_type,
        flash_attn=spec.flash_attn,
        mmap=spec.mmap,
        swa_full=spec.swa_full,
        prefix_cache=spec.prefix_cache,
        host_cache_bytes=host_cache_bytes,
        embedding=spec.embedding,
        pooling=spec.pooling,
        normalize=spec.normalize,
    )


def _retrieve_exception(task: asyncio.Task) -> None:
    """A load whose callers all gave up still ends in an exception nobody awaits: take it."""
    if not task.cancelled():
        task.exception()
