"""What runs on a Ray node for one model: an actor that starts the model's worker process there
and relays its messages to and from the API process.

The worker is the very process the local backend runs (same loop, scheduler and crash isolation);
the actor only moves messages: requests and cancels in (`send`), every step's output out through
one streaming generator (`events`), batched so a busy model costs one Ray item per wake-up rather
than one per step. Killing the actor (or losing its node) ends the worker too: it dies with its
parent process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psutil

from multiserve.backends.worker_process import WorkerProcess
from multiserve.engine.protocol import LoadFailed, StepOutput, WorkerConfig, WorkerReady

STATUS_SECONDS = 2.0  # an idle model still reports its memory this often


@dataclass(frozen=True)
class HostStatus:
    """The worker's resident memory, measured on its node."""

    rss: int | None


@dataclass(frozen=True)
class HostInfo:
    """One model actor as `multiserve models --ray` lists it."""

    model_id: str | None  # None until its model loads
    node: str
    worker_pid: int | None
    rss: int | None
    owner: str  # host:pid of the API process that placed it


@dataclass(frozen=True)
class WorkerEnded:
    """The worker process exited (the last item of `events`)."""

    exitcode: int | None


def node_label(address: str, node_id: str) -> str:
    """A node as people see it: its address and the start of Ray's id (several simulated nodes
    share an address)."""
    return f"{address}/{node_id[:8]}"


def node_name() -> str:
    """This node's label (called inside an actor)."""
    import ray

    return node_label(ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id())


def shift_deadline(message: object, by: float) -> object:
    """`message` with its queue deadline moved by `by` seconds. Deadlines are monotonic-clock
    times, which mean nothing on another machine: the API process sends the time left
    (`by=-now`), the node turns it back into a deadline on its own clock (`by=+now`)."""
    deadline = getattr(message, "queue_deadline", None)
    if deadline is None:
        return message
    return dataclasses.replace(message, queue_deadline=deadline + by)


class ModelHost:
    """A Ray actor holding one model worker on its node (see the module's docstring)."""

    def __init__(self, nice: int, owner: str) -> None:
        self._nice = nice
        self._owner = owner  # the API process that started it (host:pid)
        self._model_id: str | None = None
        self._worker: WorkerProcess | None = None
        self._inbox: asyncio.Queue[StepOutput | WorkerEnded] = asyncio.Queue()

    def ping(self) -> str:
        """This node's name (an answer means the actor was placed and started)."""
        return node_name()

    async def load(self, config: WorkerConfig) -> WorkerReady | LoadFailed:
        """Start the worker and load the model; the file must be here, on this node."""
        if not os.path.isfile(config.path):
            return LoadFailed(
                f"model file not found on node {node_name()}: with Ray, every node that may "
                "load a model needs its GGUF file at the same path (a shared filesystem, or "
                "the same copy on each node)"
            )
        self._model_id = config.model_id
        self._worker = WorkerProcess(lease=None, nice=self._nice)
        reply = await self._worker.load(config)
        if isinstance(reply, WorkerReady):
            self._worker.relay(asyncio.get_running_loop(), self._inbox.put_nowait, self._ended)
            return reply
        if isinstance(reply, LoadFailed):
            return reply
        return LoadFailed(
            f"model worker exited while loading (exit code {self._worker.process.exitcode})"
        )

    def describe(self) -> HostInfo:
        """What `multiserve models --ray` shows of this actor."""
        pid = self._worker.process.pid if self._worker is not None else None
        return HostInfo(self._model_id, node_name(), pid, self._rss(), self._owner)

    def send(self, message: object) -> None:
        """A request, cancel or shutdown for the worker (in the order the API process sent)."""
        if self._worker is not None:
            self._worker.send(shift_deadline(message, time.monotonic()))

    async def events(self) -> AsyncIterator[list[StepOutput | HostStatus | WorkerEnded]]:
        """Every message the worker sends, in batches, and its memory now and then; ends with
        WorkerEnded."""
        last_status = 0.0
        while True:
            batch: list[StepOutput | HostStatus | WorkerEnded] = []
            with contextlib.suppress(TimeoutError):
                batch.append(await asyncio.wait_for(self._inbox.get(), STATUS_SECONDS))
            while not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            if time.monotonic() - last_status >= STATUS_SECONDS:
                batch.append(HostStatus(self._rss()))
                last_status = time.monotonic()
            yield batch
            if any(isinstance(item, WorkerEnded) for item in batch):
                return

    async def stop(self) -> None:
        """Stop the worker (asked to exit, killed after a grace period)."""
        if self._worker is not None:
            await self._worker.stop()

    def kill_worker(self) -> None:
        """End a hung worker now; `events` reports its end."""
        if self._worker is not None:
            self._worker.kill()

    def _ended(self, exitcode: int | None) -> None:
        self._inbox.put_nowait(WorkerEnded(exitcode))

    def _rss(self) -> int | None:
        if self._worker is None:
            return None
        try:
            return psutil.Process(self._worker.process.pid).memory_info().rss
        except psutil.Error:
            return None
