"""API-process side of a worker: start it, send requests, route its step outputs to requests.

A reader thread turns the worker's messages into per-request asyncio queues; a writer thread
sends, so a large prompt never blocks the event loop on a full pipe. The worker's exit (clean or a
crash) is noticed by the reader at once and every request still waiting on it gets an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from multiserve.engine.lease import ComputeLease
from multiserve.engine.protocol import (
    CacheUsage,
    Cancel,
    ChoiceDelta,
    Embed,
    Embedded,
    Event,
    Generate,
    Load,
    LoadFailed,
    ModelInfo,
    Prefilled,
    Rejected,
    Shutdown,
    StepOutput,
    WorkerConfig,
    WorkerReady,
)
from multiserve.engine.worker import run_worker

STOP_GRACE_SECONDS = 5.0


class WorkerLoadError(RuntimeError):
    """The worker could not load its model; the message is safe to show a client."""


class WorkerGone(RuntimeError):
    """The worker exited while a request was in flight."""


class RequestCut(RuntimeError):
    """The server cut the request short because it is shutting down."""


@dataclass(frozen=True)
class _Exited:
    exitcode: int | None


@dataclass(frozen=True)
class _Cut:
    pass


class WorkerProcess:
    """A spawned, still blank worker process and our end of its pipe; `nice` is its scheduling
    niceness (higher is lower priority)."""

    def __init__(self, lease: ComputeLease | None, nice: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=run_worker, args=(child, lease, nice), name="multiserve-worker", daemon=True
        )
        self.process.start()
        child.close()

    def discard(self) -> None:
        """End a worker that was never given a model."""
        self.process.kill()
        self.process.join(STOP_GRACE_SECONDS)
        self.conn.close()


class RequestStream:
    """Events of one request, in order; `close` cancels it in the worker if it is not done."""

    def __init__(self, client: EngineClient, request: Generate | Embed) -> None:
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
            raise WorkerGone(f"model worker exited unexpectedly (exit code {event.exitcode})")
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


class EngineClient:
    """Handle on one worker process for one model."""

    _ids = itertools.count()

    def __init__(
        self,
        config: WorkerConfig,
        on_exit: Callable[[EngineClient], None],
    ) -> None:
        self.config = config
        self.info: ModelInfo | None = None
        self.pid: int | None = None
        self.running = 0
        self.waiting = 0
        self.host_cache = CacheUsage()
        self.alive = False
        self.accepting = True  # False once the server cut its requests at shutdown
        self.stalled_for: float | None = None  # set when killed for making no progress
        self._progress = time.monotonic()  # the last step, or when work came to an idle worker
        self._on_exit = on_exit
        self._streams: dict[str, RequestStream] = {}
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: mp.process.BaseProcess | None = None
        self._conn = None

    async def start(self, worker: WorkerProcess) -> ModelInfo:
        """Load the model in `worker` (a pre-started spare or a new one); wait until ready."""
        self._loop = asyncio.get_running_loop()
        self._process, self._conn = worker.process, worker.conn
        try:
            self._conn.send(Load(self.config))
        except OSError:
            reply = None  # a spare that died while waiting
        else:
            reply = await self._loop.run_in_executor(None, self._first_reply)
        if isinstance(reply, WorkerReady):
            self.info, self.pid, self.alive = reply.info, reply.pid, True
            threading.Thread(target=self._read_loop, daemon=True).start()
            threading.Thread(target=self._write_loop, daemon=True).start()
            return reply.info
        await self._loop.run_in_executor(None, self._process.join, STOP_GRACE_SECONDS)
        if isinstance(reply, LoadFailed):
            raise WorkerLoadError(reply.message)
        raise WorkerLoadError(
            f"model worker exited while loading (exit code {self._process.exitcode})"
        )

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
        self._outbox.put(request)
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

    def kill(self, stalled_for: float) -> None:
        """End a hung worker; its requests fail as in a crash (the reader sees it exit)."""
        self.stalled_for = stalled_for
        if self._process is not None:
            self._process.kill()

    def rss_bytes(self) -> int | None:
        """Resident memory of the worker as the OS measures it (for /stats beside the estimate)."""
        try:
            return psutil.Process(self.pid).memory_info().rss if self.pid else None
        except psutil.Error:
            return None

    async def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not within the grace period.

        A worker still loading has no writer thread to pass the request on: it is killed now."""
        process = self._process
        if process is None:
            return
        loop = asyncio.get_running_loop()
        if self.alive:
            self._outbox.put(Shutdown())
            await loop.run_in_executor(None, process.join, STOP_GRACE_SECONDS)
        if process.is_alive():
            process.kill()
            await loop.run_in_executor(None, process.join, STOP_GRACE_SECONDS)
        self._outbox.put(None)

    # -- threads -----------------------------------------------------------------------------

    def _first_reply(self) -> WorkerReady | LoadFailed | None:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            return None

    def _read_loop(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                self._loop.call_soon_threadsafe(self._dispatch, message)
        except (EOFError, OSError):
            pass
        self._process.join()
        self._loop.call_soon_threadsafe(self._exited, self._process.exitcode)

    def _write_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                return

    # -- event loop side ---------------------------------------------------------------------

    def _dispatch(self, message: StepOutput) -> None:
        self._progress = time.monotonic()
        self.running, self.waiting = message.running, message.waiting
        self.host_cache = message.host_cache
        for event in message.events:
            stream = self._streams.get(event.request_id)
            if stream is not None:
                stream.queue.put_nowait(event)

    def _exited(self, exitcode: int | None) -> None:
        self.alive = False
        self.running = self.waiting = 0
        for stream in self._streams.values():
            stream.queue.put_nowait(_Exited(exitcode))
        self._streams.clear()
        self._outbox.put(None)
        with contextlib.suppress(Exception):
            self._conn.close()
        self._on_exit(self)

    def _forget(self, request_id: str, cancel: bool) -> None:
        if self._streams.pop(request_id, None) is not None and cancel and self.alive:
            self._outbox.put(Cancel(request_id))
