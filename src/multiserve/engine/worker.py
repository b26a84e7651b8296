"""Worker process main: wait for a model, load it, then loop: read commands, run one step, reply.

Runs in a spawned process so a crash inside llama.cpp (segfault, OOM kill, corrupt file) takes
down only this model. A worker starts blank and imports llama.cpp before it is told which model
to load, so a pre-started spare makes a cold model's first token come sooner.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from multiserve.engine.protocol import (
    CacheUsage,
    Cancel,
    Event,
    Generate,
    Load,
    LoadFailed,
    Rejected,
    Shutdown,
    StepOutput,
    WorkerReady,
)

if TYPE_CHECKING:
    from multiserve.engine.lease import ComputeLease
    from multiserve.engine.scheduler import Scheduler

IDLE_POLL_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the API process dies, so no orphan holds memory."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _submit(scheduler: Scheduler, request: Generate) -> Rejected | None:
    """Queue a request; an unexpected error preparing it fails that request, not the worker."""
    try:
        return scheduler.submit(request)
    except Exception:  # isolation boundary: log it and refuse only this request
        traceback.print_exc()
        return Rejected(request.request_id, "the request could not be prepared for this model")


def _wait_for_load(conn: Connection, parent: int) -> Load | None:
    while not conn.poll(IDLE_POLL_SECONDS):
        if os.getppid() != parent:
            return None
    message = conn.recv()
    return message if isinstance(message, Load) else None


def run_worker(conn: Connection, lease: ComputeLease | None, nice: int) -> None:
    """Entry point of the worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the API process, which stops us
    _die_with_parent()
    # Decoding may take every core; a lower priority than the API process's keeps /health, refusals
    # and streamed tokens prompt. Set before llama.cpp starts its threads, which inherit it.
    os.nice(nice)
    parent = os.getppid()

    from multiserve.engine.runtime import LoadError, Runtime
    from multiserve.engine.scheduler import Scheduler

    try:
        load = _wait_for_load(conn, parent)
        if load is None:
            return
        try:
            runtime = Runtime(load.config)
        except LoadError as exc:
            conn.send(LoadFailed(str(exc)))
            return
        conn.send(WorkerReady(runtime.info(), os.getpid()))
        _serve(conn, Scheduler(runtime), lease, parent)
    except (EOFError, BrokenPipeError):
        return  # the API process is gone


def _serve(conn: Connection, scheduler: Scheduler, lease: ComputeLease | None, parent: int):
    reported: tuple[tuple[int, int], CacheUsage] = ((0, 0), CacheUsage())
    while True:
        if not scheduler.has_work() and not conn.poll(IDLE_POLL_SECONDS):
            if os.getppid() != parent:
                return
            continue
        events: list[Event] = []
        while conn.poll():
            message = conn.recv()
            if isinstance(message, Generate):
                if (refused := _submit(scheduler, message)) is not None:
                    events.append(refused)
            elif isinstance(message, Cancel):
                scheduler.cancel(message.request_id)
            elif isinstance(message, Shutdown):
                return
        if scheduler.has_work():
            if lease is not None:
                lease.acquire()
            try:
                events += scheduler.step()
            finally:
                if lease is not None:
                    lease.release()
        state = (scheduler.counts(), scheduler.host_cache_usage())
        # every step is reported, even a prompt chunk with no event: it is the API process's sign
        # of progress (a hung worker is found by its silence); a cancel changes only the counts
        if events or state != reported or scheduler.has_work():
            conn.send(StepOutput(events, *state[0], state[1]))
            reported = state
