"""The Ray backend: each model's worker in a Ray actor on a node of a Ray cluster.

Placement is decided here, from the cluster's node list: a model needs its memory estimate and its
threads free on one node (Ray's `memory` and `CPU` resources, which `ray start --memory
--num-cpus` set per node); of the nodes with room, the one with the most memory free takes it, so
models spread and do not share a node's memory bandwidth while another node idles. The actor is
then created with those resources on that node (hard node affinity), so Ray's own accounting
refuses to overcommit a node even if our view is stale; an actor Ray cannot place in time counts
as a failed load. Plain actors, not Ray Serve deployments: the fleet already owns loading,
eviction and admission, and Ray is kept out of the token path altogether: once loaded, the worker
and the API process talk over a TCP connection of their own (a relay through Ray cost about 12%
of a core at one stream on 2 cores, and 15 ms of first-token time).

A node whose actor died is avoided for a while, so a model that lost its node loads elsewhere
even before Ray has noticed the node is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

from multiserve.backends.client import (
    ModelClient,
    Placement,
    Reservation,
    RunningModel,
    WorkerLoadError,
)
from multiserve.backends.ray_host import HostInfo, HostStatus, ModelHost, node_label
from multiserve.backends.replicas import ReplicaSet
from multiserve.backends.worker_process import WorkerLink
from multiserve.config import ModelSpec, Settings
from multiserve.engine.protocol import (
    Cancel,
    Embed,
    Generate,
    LoadFailed,
    ModelInfo,
    Shutdown,
    WorkerConfig,
)
from multiserve.fleet.gguf_header import GGUFHeader, read_header
from multiserve.fleet.memory import format_bytes

log = logging.getLogger(__name__)

RAY_NAMESPACE = "multiserve"
ACTOR_PREFIX = "model-host-"
NODES_REFRESH_SECONDS = 2.0
PLACEMENT_SECONDS = 30.0  # an actor Ray has not started by then has no room where it was sent
CONNECT_SECONDS = 10.0  # to reach a loaded worker on its node
HEADER_SECONDS = 30.0  # to read a model file's header on a node
JOIN_CHECK_SECONDS = 5.0  # for the head to accept a connection at all
STOP_SECONDS = 8.0
SUSPECT_SECONDS = 60.0  # a node whose actor died takes no new model for this long
# Ray's defaults: no usage reports; and a head on 127.0.0.1 must be joined as such (otherwise
# `ray.init(address=...)` swaps in this machine's network address and retries for minutes).
RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass(frozen=True)
class RayNode:
    """A live node that can run models: its `memory` (bytes) and `CPU` resources."""

    placement: Placement
    memory: int
    cpus: int


def join_cluster(address: str) -> Any:
    """Connect this process to the Ray cluster at `address` (blocking; once); the `ray` module.
    Raises ConnectionError saying why it could not."""
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray
    if address != "auto":  # ray.init retries an address nobody answers at for minutes
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=JOIN_CHECK_SECONDS).close()
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not host:port"
            raise ConnectionError(f"cannot join the Ray cluster at {address}: {reason}") from None
    try:
        ray.init(
            address=address,
            namespace=RAY_NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConnectionError(f"cannot join the Ray cluster at {address}: {exc}") from None
    return ray


def live_nodes(ray: Any) -> list[RayNode]:
    """The cluster's live nodes that can run a model (CPUs and memory to give)."""
    return [
        RayNode(
            Placement(node["NodeID"], node_label(node["NodeManagerAddress"], node["NodeID"])),
            int(node["Resources"].get("memory", 0)),
            int(node["Resources"].get("CPU", 0)),
        )
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("CPU", 0) >= 1
    ]


def model_hosts(ray: Any, timeout: float = 5.0) -> list[HostInfo]:
    """Every model actor in the cluster, as each describes itself (those that answer)."""
    hosts = []
    for name in ray.util.list_named_actors():
        if not name.startswith(ACTOR_PREFIX):
            continue
        try:
            hosts.append(ray.get(ray.get_actor(name).describe.remote(), timeout=timeout))
        except (ValueError, ray.exceptions.RayError):
            continue  # gone meanwhile, or not answering
    return hosts


def _awaited(ref: Any) -> Awaitable[Any]:
    """A Ray object reference as an asyncio future."""
    return asyncio.wrap_future(ref.future())


class RayActorClient(ModelClient):
    """A model in a worker on a Ray node, started by a `ModelHost` actor there and reached over
    an authenticated TCP connection of its own."""

    def __init__(
        self,
        config: WorkerConfig,
        placement: Placement,
        reservation: Reservation,
        on_exit: Callable[[ModelClient], None],
        backend: RayBackend,
    ) -> None:
        super().__init__(config, placement, on_exit)
        self._reservation = reservation
        self._backend = backend
        self._actor: Any = None
        self._link: WorkerLink | None = None
        self._watch: asyncio.Task[None] | None = None  # held: the loop keeps only weak refs
        self._rss: int | None = None
        self._stopping = False  # stop() asked: its end is not a failure of the node

    async def start(self) -> ModelInfo:
        from ray.exceptions import RayError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = self.placement.node
        self._actor = self._backend.host_actor.options(
            num_cpus=self._reservation.threads,
            memory=self._reservation.memory,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.placement.node_id, soft=False),
            max_restarts=0,
            max_task_retries=0,
            name=f"{ACTOR_PREFIX}{uuid.uuid4().hex}",  # found by `multiserve models --ray`
        ).remote(self._backend.settings.worker_nice, self._backend.owner)
        try:
            await asyncio.wait_for(_awaited(self._actor.ping.remote()), PLACEMENT_SECONDS)
            reply, key = await _awaited(self._actor.load.remote(self.config))
        except TimeoutError:
            self._backend.suspect(self.placement)  # our view of the node is stale: try others
            raise WorkerLoadError(
                f"Ray did not start it on node {node} within {PLACEMENT_SECONDS:.0f}s (the "
                "node's memory or CPUs are taken, or the node is gone)"
            ) from None
        except RayError as exc:
            self._backend.suspect(self.placement)
            raise WorkerLoadError(
                f"its Ray actor on node {node} failed ({type(exc).__name__})"
            ) from None
        if isinstance(reply, LoadFailed):
            raise WorkerLoadError(reply.message)
        try:
            connecting = asyncio.to_thread(Client, reply.address, authkey=key)
            conn = await asyncio.wait_for(connecting, CONNECT_SECONDS)
        except (OSError, TimeoutError, AuthenticationError):
            raise WorkerLoadError(
                f"its worker on node {node} cannot be reached from the API process (every node "
                "must accept TCP connections from it)"
            ) from None
        self.info, self.pid, self.alive = reply.info, reply.pid, True
        loop = asyncio.get_running_loop()
        self._link = WorkerLink(conn, loop, self._dispatch, self._ended)
        self._watch = asyncio.create_task(self._watch_host())
        return reply.info

    def _send(self, message: Generate | Embed | Cancel) -> None:
        self._link.send(message)

    def kill(self, stalled_for: float) -> None:
        self.stalled_for = stalled_for
        self._end_actor()

    def rss_bytes(self) -> int | None:
        return self._rss

    async def stop(self) -> None:
        """Ask the worker to exit, let its actor see it go, then end the actor (which frees its
        resources on the node)."""
        if self._actor is None:
            return
        from ray.exceptions import RayError

        self._stopping = True
        if self._link is not None:
            self._link.send(Shutdown())
        with contextlib.suppress(RayError, TimeoutError):
            await asyncio.wait_for(_awaited(self._actor.stop.remote()), STOP_SECONDS)
        self._end_actor()

    def _end_actor(self) -> None:
        """Kill the actor (and so its worker), freeing its memory and CPUs on the node."""
        from ray.exceptions import RayError

        if self._actor is not None:
            with contextlib.suppress(RayError, ValueError):
                self._backend.ray.kill(self._actor, no_restart=True)

    async def _watch_host(self) -> None:
        """Follow the actor's status stream: the worker's memory, and its end or the actor's
        (its node's) death, which cuts the connection so the requests on it fail at once."""
        from ray.exceptions import RayError

        why = f"its worker on node {self.placement.node} ended"
        try:
            async for ref in self._actor.status.options(num_returns="streaming").remote():
                item = await ref
                if isinstance(item, HostStatus):
                    self._rss = item.rss
                else:
                    why = f"exit code {item.exitcode} on node {self.placement.node}"
        except RayError as exc:
            why = f"its Ray actor or node {self.placement.node} died ({type(exc).__name__})"
            if not self._stopping and self.stalled_for is None:
                self._backend.suspect(self.placement)
        # a node that vanished sends nothing more: fail its requests now rather than wait for
        # the connection to notice, and free what the actor holds if it is still there
        self._link.close()
        self._end_actor()
        self._exited(why)

    def _ended(self, _: object) -> None:
        self._exited(f"its connection to node {self.placement.node} ended")


class RayBackend:
    """Model workers on a Ray cluster's nodes (see the module's docstring)."""

    fixed_size = False
    missing_file = (
        "model file not found on the Ray node that looked: every node needs the GGUF file at "
        "the same path (a shared filesystem, or the same copy on each node)"
    )

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = settings.ray_address
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.ray: Any = None
        self.host_actor: Any = None
        self._read_header: Any = None
        self._nodes: list[RayNode] = []
        self._suspects: dict[str, float] = {}
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Join the cluster (raises ConnectionError with the reason if it cannot)."""
        self.ray = ray = await asyncio.to_thread(join_cluster, self.address)
        self.host_actor = ray.remote(ModelHost)
        self._read_header = ray.remote(num_cpus=0)(read_header)
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_nodes())
        log.info(
            "joined the Ray cluster at %s: %d nodes can run models", self.address, len(self._nodes)
        )

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self.ray is not None and self.ray.is_initialized():
            await asyncio.to_thread(self.ray.shutdown)

    async def read_header(self, path: Path) -> GGUFHeader:
        """The header, read on a node that runs models (the API machine needs no copy); OSError
        when no node answers in time."""
        from ray.exceptions import RayError, RayTaskError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not self._nodes:
            raise OSError(errno.EHOSTUNREACH, "the Ray cluster has no node to read it")
        node = max(self._nodes, key=lambda n: n.memory).placement.node_id
        task = self._read_header.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)
        )
        try:
            return await asyncio.wait_for(_awaited(task.remote(path)), HEADER_SECONDS)
        except RayTaskError as exc:
            raise exc.cause from None
        except (RayError, TimeoutError):
            raise OSError(errno.ETIMEDOUT, "no Ray node read it in time") from None

    def place(
        self,
        spec: ModelSpec,
        needed: int,
        held: list[Reservation],
        avoid: frozenset[str] = frozenset(),
    ) -> Reservation | None:
        """`spec.replicas` nodes with room for `needed` bytes and the model's threads, those
        with the most memory free first, none of them in `avoid` (node ids); None if not enough
        nodes have room."""
        now = time.monotonic()
        free = []
        for node in self._nodes:
            if self._suspects.get(node.placement.node_id, 0.0) > now:
                continue
            if node.placement.node_id in avoid:
                continue
            memory, cpus = self._free(node, held)
            if needed <= memory and (spec.threads or node.cpus) <= cpus:
                free.append((memory, node))
        if len(free) < spec.replicas:
            return None
        chosen = [node for _, node in sorted(free, key=lambda f: -f[0])[: spec.replicas]]
        threads = spec.threads or min(node.cpus for node in chosen)
        return Reservation(tuple(node.placement for node in chosen), needed, threads)

    def too_large(self, spec: ModelSpec, needed: int) -> str | None:
        able = [n for n in self._nodes if n.memory >= needed and (spec.threads or 1) <= n.cpus]
        if len(able) >= spec.replicas:
            return None
        if not self._nodes:
            return "and the Ray cluster has no node with CPUs and memory to run models"
        if any(n.memory >= needed for n in self._nodes) and not any(
            (spec.threads or 1) <= n.cpus for n in self._nodes if n.memory >= needed
        ):
            return (
                f"and {spec.threads} threads, more CPUs than any Ray node with that memory has; "
                "lower its threads"
            )
        if able:
            return (
                f"on {spec.replicas} nodes (replicas), and only {len(able)} Ray nodes have that "
                "much memory; add nodes or lower replicas"
            )
        largest = max(self._nodes, key=lambda n: n.memory)
        return (
            f"more than any Ray node has: the largest offers {format_bytes(largest.memory)} "
            f"(node {largest.placement.node}); add a larger node"
        )

    def client(
        self,
        config: WorkerConfig,
        reservation: Reservation,
        on_exit: Callable[[RunningModel], None],
    ) -> RunningModel:
        """One actor per place reserved; several behind a router when the model has replicas."""

        def spawn(place: Placement, member_exit: Callable[[ModelClient], None]) -> ModelClient:
            return RayActorClient(config, place, reservation, member_exit, self)

        if len(reservation.placements) == 1:
            return spawn(reservation.placements[0], on_exit)
        return ReplicaSet(spawn, reservation.placements, on_exit)

    def memory(self, held: list[Reservation]) -> dict:
        """`/stats` memory: every node's resources and what models reserve of them."""
        nodes = []
        for node in self._nodes:
            memory, cpus = self._free(node, held)
            nodes.append(
                {
                    "node": node.placement.node,
                    "node_id": node.placement.node_id,
                    "memory": node.memory,
                    "reserved": node.memory - memory,
                    "cpus": node.cpus,
                    "threads_reserved": node.cpus - cpus,
                }
            )
        return {
            "budget": sum(n["memory"] for n in nodes),
            "reserved": sum(r.memory * len(r.placements) for r in held),
            "nodes": nodes,
        }

    @staticmethod
    def _free(node: RayNode, held: list[Reservation]) -> tuple[int, int]:
        """Memory and CPUs of `node` that `held` leaves free."""
        here = [
            r for r in held for place in r.placements if place.node_id == node.placement.node_id
        ]
        return node.memory - sum(r.memory for r in here), node.cpus - sum(r.threads for r in here)

    def suspect(self, placement: Placement) -> None:
        """An actor died there: place nothing new on that node for a while."""
        self._suspects[placement.node_id] = time.monotonic() + SUSPECT_SECONDS

    async def refresh(self) -> None:
        self._nodes = await asyncio.to_thread(live_nodes, self.ray)

    async def _refresh_nodes(self) -> None:
        while True:
            await asyncio.sleep(NODES_REFRESH_SECONDS)
            try:
                await self.refresh()
            except Exception:  # keep the last view; the next refresh tries again
                log.exception("could not read the Ray cluster's nodes")
