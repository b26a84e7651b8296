"""One model served by several replicas, each a worker on its own node, behind one router.

To the fleet it is one running model (`RunningModel`): it loads when all its replicas have
loaded, and each request goes to the replica the `ReplicaRouter` picks. A replica that dies fails
only the requests it had, and the others go on serving; the model counts as failed only when no
replica is left. The fleet places a lost replica again (`lost`, `restore`) on another node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from multiserve.backends.affinity import ReplicaRouter
from multiserve.backends.client import (
    ModelClient,
    Placement,
    ReplicaView,
    RequestCut,
    RequestStream,
    RunningModel,
    WorkerGone,
    WorkerLoadError,
)
from multiserve.engine.protocol import CacheUsage, Embed, Generate, ModelInfo

log = logging.getLogger(__name__)


class ReplicaSet:
    """Replicas of one model (see the module's docstring)."""

    def __init__(
        self,
        spawn: Callable[[Placement, Callable[[ModelClient], None]], ModelClient],
        placements: tuple[Placement, ...],
        on_exit: Callable[[RunningModel], None],
    ) -> None:
        """`spawn` makes a replica's client at a place, given the callback it calls on its end."""
        self._spawn = spawn
        self.members = [spawn(place, self._member_exited) for place in placements]
        self.router = ReplicaRouter(slack=max(2, self.members[0].config.n_seq_max // 4))
        self.info: ModelInfo | None = None
        self.pid: int | None = None  # each replica's is in `replicas()`
        self.alive = False
        self.accepting = True
        self.stalled_for: float | None = None
        self.exit_reason: str | None = None
        self._on_exit = on_exit
        self._stall_timeout = float("inf")

    async def start(self) -> ModelInfo:
        """Load every replica at once; if one fails, stop the others and fail the load."""
        results = await asyncio.gather(*(m.start() for m in self.members), return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await self.stop()
            if isinstance(failure, WorkerLoadError | asyncio.CancelledError):
                raise failure
            raise WorkerLoadError(f"a replica failed to start ({type(failure).__name__})")
        if not any(m.alive for m in self.members):  # all died between loading and now
            await self.stop()
            raise WorkerLoadError("every replica exited right after loading")
        self.info, self.alive = results[0], True
        for index, member in enumerate(self.members):
            if not member.alive:
                self.router.forget(index)
        return self.info

    def open(self, request: Generate | Embed) -> RequestStream:
        if not self.accepting:
            raise RequestCut("the server is shutting down")
        loads = [m.in_flight if m.alive else None for m in self.members]
        if all(load is None for load in loads):
            raise WorkerGone("no replica of the model is running")
        return self.members[self.router.pick(request, loads)].open(request)

    def cut_all(self) -> None:
        self.accepting = False
        for member in self.members:
            member.cut_all()

    @property
    def running(self) -> int:
        return sum(m.running for m in self.members)

    @property
    def waiting(self) -> int:
        return sum(m.waiting for m in self.members)

    @property
    def host_cache(self) -> CacheUsage:
        return CacheUsage(
            sum(m.host_cache.bytes for m in self.members),
            sum(m.host_cache.entries for m in self.members),
        )

    @property
    def in_flight(self) -> int:
        return sum(m.in_flight for m in self.members)

    def stalled(self, timeout: float) -> float | None:
        self._stall_timeout = timeout
        silent = [s for m in self.members if m.alive and (s := m.stalled(timeout)) is not None]
        return max(silent, default=None)

    def kill(self, stalled_for: float) -> None:
        """End the replicas that made no step for the stall timeout (the others go on)."""
        for member in self.members:
            if member.alive and member.stalled(self._stall_timeout) is not None:
                member.kill(stalled_for)

    def rss_bytes(self) -> int | None:
        sizes = [size for m in self.members if (size := m.rss_bytes()) is not None]
        return sum(sizes) if sizes else None

    async def stop(self) -> None:
        self.alive = False  # the replicas' ends from here on are asked for, not losses
        await asyncio.gather(*(m.stop() for m in self.members), return_exceptions=True)

    def replicas(self) -> list[ReplicaView]:
        return [view for member in self.members for view in member.replicas()]

    def lost(self) -> list[int]:
        """The replicas that died while the model serves on."""
        return [i for i, m in enumerate(self.members) if not m.alive] if self.alive else []

    async def restore(self, index: int, placement: Placement) -> bool:
        """Start replica `index` again at `placement`; False if it could not (or the model was
        stopped meanwhile)."""
        member = self._spawn(placement, self._member_exited)
        try:
            await member.start()
        except WorkerLoadError as exc:
            log.warning(
                "model %s: replica on %s did not start: %s",
                member.config.model_id,
                placement.node,
                exc,
            )
            await member.stop()
            return False
        except BaseException:
            await member.stop()
            raise
        if not (self.alive and member.alive):
            await member.stop()
            return False
        self.members[index] = member
        log.info(
            "model %s: replica %d placed again on %s", member.config.model_id, index, placement.node
        )
        return True

    def _member_exited(self, member: ModelClient) -> None:
        if not self.alive or member not in self.members:
            return  # still starting, already ended, or a replacement that never joined
        living = sum(m.alive for m in self.members)
        self.router.forget(self.members.index(member))
        if living:
            log.warning(
                "model %s lost its replica on %s (%s): %d of %d replicas serve",
                member.config.model_id,
                member.placement.node,
                member.exit_reason,
                living,
                len(self.members),
            )
            return
        self.alive = False
        self.stalled_for, self.exit_reason = member.stalled_for, member.exit_reason
        self._on_exit(self)
