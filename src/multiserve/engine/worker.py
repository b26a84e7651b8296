"""Worker process main: load one model, then loop: read commands, run one batched step, reply.

Runs in a spawned process so a crash inside llama.cpp (segfault, OOM kill, corrupt file) takes
down only this model. Replies are one `StepOutput` message per step.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from multiprocessing.connection import Connection

from multiserve.engine.protocol import (
    Cancel,
    Event,
    Generate,
    LoadFailed,
    Shutdown,
    StepOutput,
    WorkerConfig,
    WorkerReady,
)

IDLE_POLL_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the API process dies, so no orphan holds memory."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


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
                    events.append(scheduler.submit(message))
                elif isinstance(message, Cancel):
                    scheduler.cancel(message.request_id)
                elif isinstance(message, Shutdown):
                    return
            if scheduler.has_work():
                events += scheduler.step()
            if events:
                running, waiting = scheduler.counts()
                conn.send(StepOutput(events, running, waiting))
    except (EOFError, BrokenPipeError):
        return  # the API process is gone
