"""The local backend: each model in a worker process on this machine, within one memory budget.

A spare worker is started ahead of need (blank, llama.cpp imported), so a cold model's first token
comes about as soon as raw llama.cpp's. Busy workers take turns on the cores through the compute
lease (llama.cpp's spinning threads collapse when two models decode on the same cores at once).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections.abc import Callable
from pathlib import Path

import psutil

from multiserve.backends.client import ModelClient, Placement, Reservation, WorkerLoadError
from multiserve.backends.worker_process import WorkerLink, WorkerProcess
from multiserve.config import ModelSpec, Settings, parse_budget
from multiserve.engine.lease import ComputeLease
from multiserve.engine.protocol import (
    Cancel,
    Embed,
    Generate,
    ModelInfo,
    WorkerConfig,
    WorkerReady,
)
from multiserve.fleet.gguf_header import GGUFHeader, read_header
from multiserve.fleet.memory import format_bytes

SPARE_DELAY_SECONDS = 3.0
THIS_MACHINE = Placement(node_id="local", node="local")


class LocalWorkerClient(ModelClient):
    """A model in a worker process on this machine, reached over a pipe."""

    def __init__(
        self,
        config: WorkerConfig,
        on_exit: Callable[[ModelClient], None],
        backend: LocalBackend,
    ) -> None:
        super().__init__(config, THIS_MACHINE, on_exit)
        self._backend = backend
        self._worker: WorkerProcess | None = None
        self._link: WorkerLink | None = None

    async def start(self) -> ModelInfo:
        """Load the model in a worker (the pre-started spare, or a new one); wait until ready."""
        self._worker = worker = self._backend.take_worker()
        try:
            reply = await worker.load(self.config)
        finally:
            self._backend.replenish_spare()
        if isinstance(reply, WorkerReady):
            self.info, self.pid, self.alive = reply.info, reply.pid, True
            loop = asyncio.get_running_loop()
            self._link = WorkerLink(
                worker.conn, loop, self._dispatch, self._ended, worker.exit_code
            )
            return reply.info
        raise WorkerLoadError(reply.message)

    def _send(self, message: Generate | Embed | Cancel) -> None:
        self._link.send(message)

    def kill(self, stalled_for: float) -> None:
        self.stalled_for = stalled_for
        if self._worker is not None:
            self._worker.process.kill()

    def rss_bytes(self) -> int | None:
        return self._worker.rss() if self._worker is not None and self.alive else None

    async def stop(self) -> None:
        if self._worker is not None:
            await self._worker.stop(self._link)

    def _ended(self, exitcode: object) -> None:
        self._exited(f"exit code {exitcode}")


class LocalBackend:
    """Workers on this machine: one memory budget, a spare worker, the compute lease."""

    fixed_size = True
    missing_file = "model file not found"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.budget = parse_budget(settings.memory_budget, psutil.virtual_memory().available)
        self._lease = ComputeLease(mp.get_context("spawn")) if settings.share_cores else None
        self._spare: WorkerProcess | None = None
        self._spare_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._spare = self._new_worker()

    async def stop(self) -> None:
        if self._spare_timer is not None:
            self._spare_timer.cancel()
        if self._spare is not None:
            self._spare.discard()
            self._spare = None

    async def read_header(self, path: Path) -> GGUFHeader:
        return await asyncio.to_thread(read_header, path)

    def place(
        self,
        spec: ModelSpec,
        needed: int,
        held: list[Reservation],
        avoid: frozenset[str] = frozenset(),
    ) -> Reservation | None:
        """This machine if `needed` bytes fit the budget beside what `held` reserves (threads
        are not reserved: busy models take turns on the cores)."""
        if needed > self.budget - sum(r.memory for r in held):
            return None
        return Reservation((THIS_MACHINE,), needed, self.settings.threads_for(spec))

    def too_large(self, spec: ModelSpec, needed: int) -> str | None:
        if needed <= self.budget:
            return None
        return (
            f"more than the whole memory budget ({format_bytes(self.budget)}): raise memory_budget"
        )

    def client(
        self, config: WorkerConfig, reservation: Reservation, on_exit: Callable[[ModelClient], None]
    ) -> LocalWorkerClient:
        return LocalWorkerClient(config, on_exit, self)

    def memory(self, held: list[Reservation]) -> dict:
        """`/stats` memory: the budget and what loaded or loading models reserve of it."""
        return {"budget": self.budget, "reserved": sum(r.memory for r in held)}

    def take_worker(self) -> WorkerProcess:
        """The spare if it is still alive, else a new worker."""
        spare, self._spare = self._spare, None
        if spare is None or not spare.alive:
            spare = self._new_worker()
        return spare

    def replenish_spare(self) -> None:
        """Start the next spare a little after a load: booting it now would take CPU from the
        model just loaded, at the moment its first requests need it most."""
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
