"""Worker process main: load one model, then loop: read commands, run one batched step, reply.

Runs in a spawned process so a crash inside llama.cpp (segfault, OOM kill, corrupt file) takes
down only this model. Replies are one `StepOutput` message per step.
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
    Cancel,
    Event,
    Generate,
    LoadFailed,
    Rejected,
    Shutdown,
    StepOutput,
    WorkerConfig,
    WorkerReady,
)

if TYPE_CHECKING:
    from multiserve.engine.scheduler import Scheduler

IDLE_POLL_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the API process dies, so no orphan holds memory."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _submit(scheduler: Scheduler, request: Generate) -> Event:
    """Queue a request; an unexpected error preparing it fails that request, not the worker."""
    try:
        return scheduler.submit(request)
    except Exception:
        traceback.print_exc()
        return Rejected(request.request_id, "the request could not be prepared for this model")


def run_worker(conn: Connection, config: WorkerConfig) -> None:
    """Entry point of the worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the API process, which stops us
    _die_with_parent()
    parent = os.getppid()

    from multiserve.engine.runtime import LoadError, Runtime
    from multiserve.engine.scheduler import Scheduler

    try:
        runtime = Runtime(config)
    except LoadError as exc:
        conn.send(LoadFailed(str(exc)))
        return
    scheduler = Scheduler(runtime)
    conn.send(WorkerReady(runtime.info(), os.getpid()))

    reported = (0, 0)
    try:
        while True:
            if not scheduler.has_work() and not conn.poll(IDLE_POLL_SECONDS):
                if os.getppid() != parent:
                    return
                continue
            events: list[Event] = []
            while conn.poll():
                message = conn.recv()
                if isinstance(message, Generate):
                    events.append(_submit(scheduler, message))
                elif isinstance(message, Cancel):
                    scheduler.cancel(message.request_id)
                elif isinstance(message, Shutdown):
                    return
            if scheduler.has_work():
                events += scheduler.step()
            counts = scheduler.counts()
            if events or counts != reported:  # a cancel changes the counts without any event
                conn.send(StepOutput(events, *counts))
                reported = counts
    except (EOFError, BrokenPipeError):
        return  # the API process is gone
