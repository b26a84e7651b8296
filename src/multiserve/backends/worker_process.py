"""A model worker process, and our end of a loaded worker's connection.

The process is started by whichever process runs it: the API process (local backend) or a Ray
actor on a node (Ray backend). A `WorkerLink` is the API process's end of a loaded worker's
connection, a pipe to a local worker or TCP to a worker on another node: a reader thread hands
each message the worker sends to a callback on the event loop, and a writer thread sends, so a
large prompt never blocks the event loop on a full pipe. The connection's end reaches the end
callback at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import queue
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

import psutil

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

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 5.0


class WorkerLink:
    """Our end of a loaded worker's connection (see the module's docstring).

    `on_end` gets what `ended` returns, called on the reader thread once the connection is
    closed (the local backend waits there for the process's exit code)."""

    def __init__(
        self,
        conn: Connection,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[StepOutput], None],
        on_end: Callable[[object], None],
        ended: Callable[[], object] = lambda: None,
    ) -> None:
        self._conn = conn
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        args = (loop, on_message, on_end, ended)
        threading.Thread(target=self._read_loop, args=args, daemon=True).start()
        threading.Thread(target=self._write_loop, daemon=True).start()

    def send(self, message: object) -> None:
        self._outbox.put(message)

    def close(self) -> None:
        """Cut the connection. A socket is shut down first: closing alone does not wake a
        reader blocked on a peer that went silent (a node that vanished)."""
        with contextlib.suppress(OSError, ValueError):
            fd = os.dup(self._conn.fileno())
            try:
                sock = socket.socket(fileno=fd)
            except OSError:  # a pipe: closing it is enough
                os.close(fd)
            else:
                with sock:
                    sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._conn.close()

    def _read_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[StepOutput], None],
        on_end: Callable[[object], None],
        ended: Callable[[], object],
    ) -> None:
        try:
            while True:
                message = self._conn.recv()
                loop.call_soon_threadsafe(on_message, message)
        except (EOFError, OSError, TypeError):  # TypeError: closed under a blocked recv
            pass
        except Exception:  # a message that does not unpickle (another version on the node)
            log.exception("unreadable message from a model worker: closing its connection")
        outcome = ended()
        self._outbox.put(None)
        self.close()
        loop.call_soon_threadsafe(on_end, outcome)

    def _write_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                return


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

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    async def load(
        self, config: WorkerConfig, listen: tuple[str, bytes] | None = None
    ) -> WorkerReady | LoadFailed:
        """Send `Load` and wait for the answer (LoadFailed too if the worker exited instead)."""
        loop = asyncio.get_running_loop()
        try:
            self.conn.send(Load(config, listen))
        except OSError:
            reply = None  # a spare that died while waiting
        else:
            reply = await loop.run_in_executor(None, self._first_reply)
        if not isinstance(reply, WorkerReady):
            await loop.run_in_executor(None, self.process.join, STOP_GRACE_SECONDS)
        if reply is None:
            exitcode = self.process.exitcode
            reply = LoadFailed(f"model worker exited while loading (exit code {exitcode})")
        return reply

    def rss(self) -> int | None:
        """Resident memory of the worker as the OS measures it; None once it is gone."""
        try:
            return psutil.Process(self.process.pid).memory_info().rss
        except psutil.Error:
            return None

    def exit_code(self) -> int | None:
        """Wait for the process to end; its exit code."""
        self.process.join()
        return self.process.exitcode

    async def stop(self, link: WorkerLink | None) -> None:
        """Ask the worker to exit over `link`; kill it if it does not within the grace period
        (a worker with no link yet, still loading, is killed now)."""
        if link is not None:
            link.send(Shutdown())
        await self.end(STOP_GRACE_SECONDS if link is not None else 0.0)

    async def end(self, grace: float) -> None:
        """Wait up to `grace` seconds for the worker to exit, then kill it."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.process.join, grace)
        if self.process.is_alive():
            self.process.kill()
            await loop.run_in_executor(None, self.process.join, STOP_GRACE_SECONDS)

    def discard(self) -> None:
        """End a worker that was never given a model."""
        self.process.kill()
        self.process.join(STOP_GRACE_SECONDS)
        self.conn.close()

    def _first_reply(self) -> WorkerReady | LoadFailed | None:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None
