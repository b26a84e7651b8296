"""A compute lease shared by all workers: busy models take turns on the cores, one step each.

llama.cpp sizes its thread pool to the machine; two models decoding at once oversubscribe the
cores and their spinning threads collapse each other's throughput. Each worker holds the lease
for one batched decode step. Turns are FIFO tickets, so busy models alternate round-robin and an
idle model costs nothing.

A worker can die anywhere (segfault, OOM kill, SIGKILL), so nothing here may wait on a dead
process. The ticket counters are guarded by a POSIX record lock on a file, which the kernel
drops when its holder dies (a multiprocessing lock would stay taken forever and wedge every
other model); the file has no name, workers inherit its descriptor at spawn. Waiters sleep on
their own semaphore, which the releaser posts; a waiter whose sleep times out skips a turn held
or awaited by a dead process.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import reduction
from multiprocessing.context import SpawnContext
from multiprocessing.synchronize import Semaphore

MAX_WAITERS = 64  # tickets outstanding at once: one per worker at most (the config checks)
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
        self._guard_fd, path = tempfile.mkstemp(prefix="multiserve-lease-")
        os.unlink(path)  # an open, nameless file: nothing to clean up, nothing a tmp cleaner eats
        self._next = ctx.RawValue(ctypes.c_uint64, 0)
        self._serving = ctx.RawValue(ctypes.c_uint64, 0)
        self._owners = ctx.RawArray(ctypes.c_int32, MAX_WAITERS)
        self._wake = [ctx.Semaphore(0) for _ in range(MAX_WAITERS)]

    def __getstate__(self) -> dict:
        # only while spawning a worker: the child gets its own copy of the descriptor
        return {**self.__dict__, "_guard_fd": reduction.DupFd(self._guard_fd)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _guard_fd=state["_guard_fd"].detach())

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        fcntl.lockf(self._guard_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._guard_fd, fcntl.LOCK_UN)

    def acquire(self) -> None:
        with self._guarded():
            ticket = self._next.value
            self._owners[ticket % MAX_WAITERS] = os.getpid()  # before the ticket counts
            self._next.value = ticket + 1
            wake = self._wake[ticket % MAX_WAITERS]
            while wake.acquire(False):  # posts left over from this slot's earlier tickets
                pass
            if self._serving.value == ticket:
                return  # uncontended: one trip through the guard
        while True:
            woken = wake.acquire(timeout=STALL_CHECK_SECONDS)
            with self._guarded():
                skipped_to = None if woken else self._skip_dead_holder()
                served = self._serving.value == ticket
            if skipped_to is not None:
                skipped_to.release()
            if served:
                return

    def release(self) -> None:
        with self._guarded():
            next_owner = self._advance()
        if next_owner is not None:
            next_owner.release()  # after the guard: the woken waiter need not wait for it

    def _advance(self) -> Semaphore | None:
        """Serve the next ticket (guard held); the semaphore to post to wake its owner."""
        self._serving.value += 1
        serving = self._serving.value
        return self._wake[serving % MAX_WAITERS] if serving < self._next.value else None

    def _skip_dead_holder(self) -> Semaphore | None:
        serving = self._serving.value
        if serving < self._next.value and not _alive(self._owners[serving % MAX_WAITERS]):
            return self._advance()
        return None
