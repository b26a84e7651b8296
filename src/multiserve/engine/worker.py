"""Worker process main: wait for a model, load it, then loop: take commands, run one step, reply.

Runs in a spawned process so a crash inside llama.cpp (segfault, OOM kill, corrupt file) takes
down only this model. A worker starts blank and imports llama.cpp before it is told which model
to load, so a pre-started spare makes a cold model's first token come sooner.

A reader thread receives the API process's commands and prepares each request (tokenizing,
checking, compiling its grammar) while the main thread decodes: llama.cpp releases the GIL in
both, so a 4 MiB prompt or a large JSON schema does not stall the streams already running.

On a Ray node the worker's parent is a small actor; once loaded, the worker serves the API process
itself over an authenticated TCP connection (`Load.listen`), so no relay sits in the token path.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
import threading
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from typing import TYPE_CHECKING

from multiserve.engine.protocol import (
    CacheUsage,
    Cancel,
    Embed,
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
    from multiserve.engine.embedder import Embedder, EmbedJob
    from multiserve.engine.lease import ComputeLease
    from multiserve.engine.scheduler import Job, Scheduler

IDLE_POLL_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the API process dies, so no orphan holds memory."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _prepare(
    scheduler: Scheduler | Embedder, request: Generate | Embed
) -> Job | EmbedJob | Rejected:
    """A request made ready to queue; an unexpected error fails that request, not the worker."""
    try:
        return scheduler.prepare(request)
    except Exception:  # isolation boundary: log it and refuse only this request
        traceback.print_exc()
        return Rejected(request.request_id, "the request could not be prepared for this model")


_GONE = object()  # the pipe closed: the API process is gone


def _read_commands(
    conn: Connection, scheduler: Scheduler | Embedder, inbox: queue.SimpleQueue
) -> None:
    """Reader thread: commands in arrival order, requests already prepared.

    At the lowest priority: on a machine whose cores all decode, a preparing thread that ran
    at the decode threads' priority would stall llama.cpp's threads at their every barrier.
    """
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: per thread
    try:
        while True:
            message = conn.recv()
            ready = isinstance(message, Generate | Embed)
            inbox.put(_prepare(scheduler, message) if ready else message)
            if isinstance(message, Shutdown):
                return
    except (EOFError, OSError):
        inbox.put(_GONE)


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

    from multiserve.engine.embedder import Embedder
    from multiserve.engine.runtime import LoadError, Runtime
    from multiserve.engine.scheduler import Scheduler

    try:
        load = _wait_for_load(conn, parent)
        if load is None:
            return
        try:
            runtime = Runtime(load.config)
            steps = Embedder(runtime) if load.config.embedding else Scheduler(runtime)
        except LoadError as exc:
            conn.send(LoadFailed(str(exc)))
            return
        if load.listen is None:
            conn.send(WorkerReady(runtime.info(), os.getpid()))
            _serve(conn, steps, lease, parent)
            return
        with Listener((load.listen[0], 0), authkey=load.listen[1]) as listener:
            conn.send(WorkerReady(runtime.info(), os.getpid(), listener.address))
            client = _accept(listener)
        with client:
            _serve(client, steps, lease, parent)
    except (EOFError, BrokenPipeError, ConnectionError):
        return  # the API process is gone


def _accept(listener: Listener) -> Connection:
    """The first connection that proves it holds the key; any other (a wrong key, a reset, a
    peer that sends garbage) is dropped and the next one awaited. The wait ends with this
    process: the actor that started it is killed if the API process never connects."""
    while True:
        try:
            return listener.accept()
        except (AuthenticationError, OSError, EOFError):
            continue


def _serve(
    conn: Connection, scheduler: Scheduler | Embedder, lease: ComputeLease | None, parent: int
):
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    reader = threading.Thread(target=_read_commands, args=(conn, scheduler, inbox), daemon=True)
    reader.start()
    reported: tuple[tuple[int, int], CacheUsage] = ((0, 0), CacheUsage())
    while True:
        messages = []
        if not scheduler.has_work():
            try:
                messages.append(inbox.get(timeout=IDLE_POLL_SECONDS))
            except queue.Empty:
                if os.getppid() != parent:
                    return
                continue
        while not inbox.empty():
            messages.append(inbox.get())
        events: list[Event] = []
        for message in messages:
            if isinstance(message, Rejected):
                events.append(message)
            elif isinstance(message, Cancel):
                scheduler.cancel(message.request_id)
            elif isinstance(message, Shutdown) or message is _GONE:
                return
            else:
                scheduler.enqueue(message)
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
