"""The compute lease across real processes: one holder at a time, FIFO turns, and no process's
death (while holding a turn, waiting for one, or inside the lease's own bookkeeping) can wedge
the others."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from multiserve.engine.lease import ComputeLease

CTX = mp.get_context("spawn")


def _take_turns(lease: ComputeLease, inside, total, turns: int) -> None:
    for _ in range(turns):
        lease.acquire()
        inside.value += 1
        overlap = inside.value > 1
        time.sleep(0.001)
        total.value += 1 if not overlap else 10_000  # an overlap shows in the total
        inside.value -= 1
        lease.release()


def _hold_turn_forever(lease: ComputeLease, ready) -> None:
    lease.acquire()
    ready.set()
    time.sleep(3600)


def _hold_bookkeeping_forever(lease: ComputeLease, ready) -> None:
    with lease._guarded():
        ready.set()
        time.sleep(3600)


def _wait_for_turn(lease: ComputeLease, ready) -> None:
    ready.set()
    lease.acquire()
    time.sleep(3600)


def _acquires_within(lease: ComputeLease, seconds: float) -> bool:
    done = threading.Event()

    def take() -> None:
        lease.acquire()
        done.set()

    threading.Thread(target=take, daemon=True).start()
    got_it = done.wait(seconds)
    if got_it:
        lease.release()
    return got_it


def _spawn(target, *args) -> mp.Process:
    process = CTX.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _killed(process: mp.Process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(5)


def test_one_holder_at_a_time_across_processes() -> None:
    lease = ComputeLease(CTX)
    inside, total = CTX.RawValue("i", 0), CTX.RawValue("i", 0)
    workers = [_spawn(_take_turns, lease, inside, total, 50) for _ in range(3)]
    for worker in workers:
        worker.join(60)
    assert total.value == 150


@pytest.mark.parametrize(
    "victim",
    [_hold_turn_forever, _hold_bookkeeping_forever],
    ids=["holding-a-turn", "inside-the-bookkeeping"],
)
def test_a_holder_killed_does_not_wedge_the_others(victim) -> None:
    lease = ComputeLease(CTX)
    ready = CTX.Event()
    holder = _spawn(victim, lease, ready)
    assert ready.wait(30)
    _killed(holder)
    assert _acquires_within(lease, 5.0)
    assert _acquires_within(lease, 1.0)  # and the lease keeps working afterwards


def test_a_waiter_killed_loses_its_turn_only() -> None:
    lease = ComputeLease(CTX)
    lease.acquire()  # this process holds the turn
    ready = CTX.Event()
    waiter = _spawn(_wait_for_turn, lease, ready)
    assert ready.wait(30)
    time.sleep(0.2)  # the waiter has taken its ticket
    _killed(waiter)
    lease.release()  # the dead waiter's turn comes up next; it is skipped
    holder_ready = CTX.Event()
    other = _spawn(_hold_turn_forever, lease, holder_ready)
    assert holder_ready.wait(10)
    _killed(other)
