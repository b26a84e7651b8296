"""What runs on a Ray node for one model: an actor that starts the model's worker process there.

The worker is the very process the local backend runs (same loop, scheduler and crash isolation).
Once loaded it listens on the node's address for the API process, which connects with a key only
the two of them have (the actor hands it over): requests and every step's output then go between
them directly, with no Ray call per token. The actor stays for the worker's life: Ray places it
(with the model's memory and threads as resources), its `status` stream tells the API process the
worker's memory and, at the end, how it ended, and it fails with its node. Killing the actor (or
losing its node) ends the worker too: it dies with its parent process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from multiserve.backends.worker_process import STOP_GRACE_SECONDS, WorkerProcess
from multiserve.engine.protocol import LoadFailed, WorkerConfig, WorkerReady

STATUS_SECONDS = 2.0  # the worker's memory is reported this often


@dataclass(frozen=True)
class HostStatus:
    """The worker's resident memory, measured on its node."""

    rss: int | None


@dataclass(frozen=True)
class WorkerEnded:
    """The worker process exited (the last item of `status`)."""

    exitcode: int | None


@dataclass(frozen=True)
class HostInfo:
    """One model actor as `multiserve models --ray` lists it."""

    model_id: str | None  # None until its model loads
    node: str
    worker_pid: int | None
    rss: int | None
    owner: str  # host:pid of the API process that placed it


def node_label(address: str, node_id: str) -> str:
    """A node as people see it: its address and the start of Ray's id (several simulated nodes
    share an address)."""
    return f"{address}/{node_id[:8]}"


def node_name() -> str:
    """This node's label (called inside an actor)."""
    import ray

    return node_label(ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id())


class ModelHost:
    """A Ray actor holding one model worker on its node (see the module's docstring)."""

    def __init__(self, nice: int, owner: str) -> None:
        self._nice = nice
        self._owner = owner  # the API process that started it (host:pid)
        self._model_id: str | None = None
        self._worker: WorkerProcess | None = None

    def ping(self) -> str:
        """This node's name (an answer means the actor was placed and started)."""
        return node_name()

    async def load(self, config: WorkerConfig) -> tuple[WorkerReady | LoadFailed, bytes]:
        """Start the worker and load the model; the file must be here, on this node. With the
        worker's answer goes the key it takes connections with."""
        if not os.path.isfile(config.path):
            message = (
                f"model file not found on node {node_name()}: with Ray, every node that may "
                "load a model needs its GGUF file at the same path (a shared filesystem, or "
                "the same copy on each node)"
            )
            return LoadFailed(message), b""
        import ray

        self._model_id = config.model_id
        key = os.urandom(32)
        self._worker = WorkerProcess(lease=None, nice=self._nice)
        reply = await self._worker.load(config, listen=(ray.util.get_node_ip_address(), key))
        return reply, key

    async def status(self) -> AsyncIterator[HostStatus | WorkerEnded]:
        """The worker's memory every STATUS_SECONDS, then how it ended (the last item)."""
        worker = self._worker
        if worker is None:
            return
        while True:
            await asyncio.to_thread(worker.process.join, STATUS_SECONDS)
            if not worker.alive:
                yield WorkerEnded(worker.process.exitcode)
                return
            yield HostStatus(self._rss())

    async def stop(self) -> None:
        """Let the worker exit (the API process asked it to), killing it after a grace period."""
        if self._worker is not None:
            await self._worker.end(STOP_GRACE_SECONDS)

    def describe(self) -> HostInfo:
        """What `multiserve models --ray` shows of this actor."""
        pid = self._worker.process.pid if self._worker is not None else None
        return HostInfo(self._model_id, node_name(), pid, self._rss(), self._owner)

    def _rss(self) -> int | None:
        return self._worker.rss() if self._worker is not None else None
