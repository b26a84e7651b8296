"""A model worker process and our end of its pipe, for whichever process runs it: the API process
(local backend) or a Ray actor on a node (Ray backend).

After the load, a reader thread hands each message the worker sends to a callback on the event
loop, and a writer thread sends, so a large prompt never blocks the event loop on a full pipe. The
worker's exit (clean or a crash) reaches the end callback at once, with its exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import threading
from collections.abc import Callable

from multiserve.engine.lease import ComputeLease
from multiserve.engine.protocol import (
    Load,
    LoadFailed,
    Shutdown,
    StepOutput,
    WorkerConfig,
    WorkerReady,
)
from multiserve.engine.worker import run_worker

STOP_GRACE_SECONDS = 5.0


class WorkerProcess:
    """A spawned worker, blank until `load`; `nice` is its scheduling niceness (higher is lower
    priority)."""

    def __init__(self, lease: ComputeLease | None, nice: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=run_worker, args=(child, lease, nice), name="multiserve-worker", daemon=True
        )
        self.process.start()
        child.close()
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._relaying = False

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    async def load(self, config: WorkerConfig) -> WorkerReady | LoadFailed | None:
        """Send `Load` and wait for the answer; None if the worker exited instead."""
        loop = asyncio.get_running_loop()
        try:
            self.conn.send(Load(config))
        except OSError:
            reply = None  # a spare that died while waiting
        else:
            reply = await loop.run_in_executor(None, self._first_reply)
        if not isinstance(reply, WorkerReady):
            await loop.run_in_executor(None, self.process.join, STOP_GRACE_SECONDS)
        return reply

    def relay(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[StepOutput], None],
        on_end: Callable[[int | None], None],
    ) -> None:
        """Start the reader and writer threads of a loaded worker."""
        self._relaying = True
        threading.Thread(
            target=self._read_loop, args=(loop, on_message, on_end), daemon=True
        ).start()
        threading.Thread(target=self._write_loop, daemon=True).start()

    def send(self, message: object) -> None:
        self._outbox.put(message)

    def kill(self) -> None:
        self.process.kill()

    async def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not within the grace period.

        A worker not relaying yet (still loading) cannot be asked: it is killed now."""
        loop = asyncio.get_running_loop()
        if self._relaying and self.process.is_alive():
            self._outbox.put(Shutdown())
            await loop.run_in_executor(None, self.process.join, STOP_GRACE_SECONDS)
        if self.process.is_alive():
            self.process.kill()
            await loop.run_in_executor(None, self.process.join, STOP_GRACE_SECONDS)
        self._outbox.put(None)

    def discard(self) -> None:
        """End a worker that was never given a model."""
        self.process.kill()
        self.process.join(STOP_GRACE_SECONDS)
        self.conn.close()

    # -- threads -----------------------------------------------------------------------------

    def _first_reply(self) -> WorkerReady | LoadFailed | None:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def _read_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[StepOutput], None],
        on_end: Callable[[int | None], None],
    ) -> None:
        try:
            while True:
                message = self.conn.recv()
                loop.call_soon_threadsafe(on_message, message)
        except (EOFError, OSError):
            pass
        self.process.join()
        self._outbox.put(None)
        with contextlib.suppress(Exception):
            self.conn.close()
        loop.call_soon_threadsafe(on_end, self.process.exitcode)

    def _write_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                return
