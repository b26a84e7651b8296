"""A compute lease shared by all workers: busy models take turns on the cores, one step each.

llama.cpp sizes its thread pool to the machine; two models decoding at once oversubscribe the
cores and their spinning threads collapse each other's throughput. Each worker holds the lease
for one batched decode step. Turns are FIFO tickets, so busy models alternate round-robin and an
idle model costs nothing. A worker killed while holding or awaiting a turn is skipped: waiters
check the pid of the ticket being served whenever a wait times out.
"""

from __future__ import annotations

import ctypes
import os
from multiprocessing.context import SpawnContext

MAX_WAITERS = 256  # tickets outstanding at once (one per worker at most)
STALL_CHECK_SECONDS = 0.5


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ComputeLease:
    """FIFO ticket lock across processes; pass it to workers at spawn."""

    def __init__(self, ctx: SpawnContext) -> None:
        self._cond = ctx.Condition(ctx.Lock())
        self._next = ctx.RawValue(ctypes.c_uint64, 0)
        self._serving = ctx.RawValue(ctypes.c_uint64, 0)
        self._owners = ctx.RawArray(ctypes.c_int32, MAX_WAITERS)

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next.value
            self._next.value = ticket + 1
            self._owners[ticket % MAX_WAITERS] = os.getpid()
            while self._serving.value != ticket:
                if not self._cond.wait(STALL_CHECK_SECONDS):
                    self._skip_dead_holder()

    def release(self) -> None:
        with self._cond:
            self._serving.value += 1
            self._cond.notify_all()

    def _skip_dead_holder(self) -> None:
        serving = self._serving.value
        if serving < self._next.value and not _alive(self._owners[serving % MAX_WAITERS]):
            self._serving.value = serving + 1
            self._cond.notify_all()
