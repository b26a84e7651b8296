"""The API process's handle on one running model, whatever runs it (a local worker process, a
Ray actor on another node): open a request and read its events, cancel, counts, memory, stop.

A backend's client only moves messages: it sends requests and cancels (`_send`) and hands each
`StepOutput` the worker sends to `_dispatch`, and reports the worker's end to `_exited`. Routing
events to per-request asyncio queues, the counts and the stall clock live here, once.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from multiserve.engine.protocol import (
    CacheUsage,
    Cancel,
    ChoiceDelta,
    Embed,
    Embedded,
    Event,
    Generate,
    ModelInfo,
    Prefilled,
    Rejected,
    StepOutput,
    WorkerConfig,
)


@dataclass(frozen=True)
class Placement:
    """Where a model's worker runs: a node's id for placement, and a name for people."""

    node_id: str
    node: str


@dataclass(frozen=True)
class Reservation:
    """What a loaded or loading model holds: memory (its estimate) and threads at each of its
    places, one per replica, on distinct nodes."""

    placements: tuple[Placement, ...]
    memory: int
    threads: int


@dataclass(frozen=True)
class ReplicaView:
    """One replica of a running model, for /stats, /v1/models and /metrics."""

    placement: Placement
    state: str  # "loading", "loaded", or "failed" (its worker or node died)
    in_flight: int
    pid: int | None
    requests: int  # routed to it since it started


class RunningModel(Protocol):
    """What the fleet and the API use of a running model: one worker (`ModelClient`) or
    several replicas of it behind one router (`ReplicaSet`)."""

    info: ModelInfo | None
    pid: int | None
    running: int
    waiting: int
    host_cache: CacheUsage
    alive: bool
    stalled_for: float | None
    exit_reason: str | None

    async def start(self) -> ModelInfo: ...
    def open(self, request: Generate | Embed) -> RequestStream: ...
    def cut_all(self) -> None: ...
    @property
    def in_flight(self) -> int: ...
    def stalled(self, timeout: float) -> float | None: ...
    def kill(self, stalled_for: float) -> None: ...
    def rss_bytes(self) -> int | None: ...
    async def stop(self) -> None: ...
    def replicas(self) -> list[ReplicaView]: ...
    def lost(self) -> list[int]: ...
    async def restore(self, index: int, placement: Placement) -> bool: ...


class WorkerLoadError(RuntimeError):
    """The worker could not load its model; the message is safe to show a client."""


class WorkerGone(RuntimeError):
    """The worker exited while a request was in flight."""


class RequestCut(RuntimeError):
    """The server cut the request short because it is shutting down."""


@dataclass(frozen=True)
class _Exited:
    why: str  # "exit code -9", "its node died"


@dataclass(frozen=True)
class _Cut:
    pass


class RequestStream:
    """Events of one request, in order; `close` cancels it in the worker if it is not done."""

    def __init__(self, client: ModelClient, request: Generate | Embed) -> None:
        self._client = client
        self.request = request
        self.queue: asyncio.Queue[Event | _Exited | _Cut] = asyncio.Queue()
        self._open_choices = request.n if isinstance(request, Generate) else 1
        self.done = False
        self.cached_tokens = 0  # prompt tokens the worker took from its cache

    async def next(self) -> Event:
        """The next event; raises WorkerGone if the worker died first, RequestCut if the server
        cut the request at shutdown."""
        event = await self.queue.get()
        if isinstance(event, _Exited):
            self.done = True
            raise WorkerGone(f"model worker exited unexpectedly ({event.why})")
        if isinstance(event, _Cut):
            self.done = True
            raise RequestCut("the server is shutting down")
        if isinstance(event, Rejected | Embedded):
            self.done = True
        elif isinstance(event, Prefilled):
            self.cached_tokens = event.cached_tokens
        elif isinstance(event, ChoiceDelta) and event.finish_reason is not None:
            self._open_choices -= 1
            self.done = self._open_choices == 0
        return event

    def close(self) -> None:
        self._client._forget(self.request.request_id, cancel=not self.done)
        self.done = True


class ModelClient(ABC):
    """Handle on one running model (one worker); subclasses move its messages."""

    def __init__(
        self,
        config: WorkerConfig,
        placement: Placement,
        on_exit: Callable[[ModelClient], None],
    ) -> None:
        self.config = config
        self.placement = placement
        self.info: ModelInfo | None = None
        self.pid: int | None = None
        self.running = 0
        self.waiting = 0
        self.host_cache = CacheUsage()
        self.alive = False
        self.accepting = True  # False once the server cut its requests at shutdown
        self.stalled_for: float | None = None  # set when killed for making no progress
        self.exit_reason: str | None = None  # how the worker ended ("exit code -9", ...)
        self._progress = time.monotonic()  # the last step, or when work came to an idle worker
        self._on_exit = on_exit
        self._streams: dict[str, RequestStream] = {}
        self.requests = 0  # opened since it started

    # -- what a backend provides -------------------------------------------------------------

    @abstractmethod
    async def start(self) -> ModelInfo:
        """Load the model; return once it takes requests (raise WorkerLoadError if it cannot)."""

    @abstractmethod
    def _send(self, message: Generate | Embed | Cancel) -> None:
        """Pass a message to the worker without blocking the event loop."""

    @abstractmethod
    def kill(self, stalled_for: float) -> None:
        """End a hung worker; its requests fail as in a crash."""

    @abstractmethod
    def rss_bytes(self) -> int | None:
        """Resident memory of the worker as its OS measures it (for /stats beside the estimate)."""

    @abstractmethod
    async def stop(self) -> None:
        """Ask the worker to exit, and make sure it does."""

    # -- requests ----------------------------------------------------------------------------

    def open(self, request: Generate | Embed) -> RequestStream:
        """Send a request; read its events from the returned stream, and always `close` it."""
        if not self.accepting:
            raise RequestCut("the server is shutting down")
        if not self.alive:
            raise WorkerGone("model worker is not running")
        if not self._streams:
            self._progress = time.monotonic()  # an idle worker's silence was not a stall
        stream = RequestStream(self, request)
        self._streams[request.request_id] = stream
        self.requests += 1
        self._send(request)
        return stream

    def cut_all(self) -> None:
        """Take no more requests and end every open one with RequestCut (server shutdown)."""
        self.accepting = False
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(_Cut())
            self._forget(stream.request.request_id, cancel=True)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def stalled(self, timeout: float) -> float | None:
        """Seconds without a step while it has requests, if more than `timeout`."""
        silent = time.monotonic() - self._progress
        return silent if self._streams and silent > timeout else None

    def replicas(self) -> list[ReplicaView]:
        state = "loaded" if self.alive else ("loading" if self.exit_reason is None else "failed")
        return [ReplicaView(self.placement, state, self.in_flight, self.pid, self.requests)]

    def lost(self) -> list[int]:
        """Replicas that died while the model serves on: one worker has none to lose."""
        return []

    async def restore(self, index: int, placement: Placement) -> bool:
        return False

    # -- called by subclasses on the event loop ----------------------------------------------

    def _dispatch(self, message: StepOutput) -> None:
        self._progress = time.monotonic()
        self.running, self.waiting = message.running, message.waiting
        self.host_cache = message.host_cache
        for event in message.events:
            stream = self._streams.get(event.request_id)
            if stream is not None:
                stream.queue.put_nowait(event)

    def _exited(self, why: str) -> None:
        """The worker is gone (`why`: how, for logs): fail every request still on it, then tell
        the fleet. Only the first report counts (a connection and a watcher may both tell)."""
        if self.exit_reason is not None:
            return
        self.alive, self.exit_reason = False, why
        self.running = self.waiting = 0
        for stream in self._streams.values():
            stream.queue.put_nowait(_Exited(why))
        self._streams.clear()
        self._on_exit(self)

    def _forget(self, request_id: str, cancel: bool) -> None:
        if self._streams.pop(request_id, None) is not None and cancel and self.alive:
            self._send(Cancel(request_id))
