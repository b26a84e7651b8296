"""The hand-over of a worker to a request that waited for it (routes._engine), on a fake fleet:
a worker stopped while the request's task had not run again yet is never handed over, and a
wait past the queue deadline stops the wait it started."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from multiserve.api.errors import APIError
from multiserve.api.routes import _engine


class Connected:
    """A client that stays: its `receive` never says http.disconnect."""

    async def receive(self) -> dict:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}


@dataclass
class Entry:
    client: object | None = None
    spec: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(id="m"))


class Fleet:
    """Hands out `workers` in turn, each after a wait; `stop_first` stops the first one (as an
    eviction would) right after handing it out, before the waiting task can run again."""

    def __init__(
        self, entry: Entry, workers: list[object], stop_first: bool, wait: float = 0.01
    ) -> None:
        self.entry, self.workers, self.stop_first, self.wait = entry, workers, stop_first, wait
        self.calls = 0
        self.cancelled = 0

    def ready(self, entry: Entry) -> object | None:
        return None  # never ready at once: every request waits

    async def engine(self, entry: Entry) -> object:
        self.calls += 1
        try:
            await asyncio.sleep(self.wait)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        worker = self.workers[self.calls - 1]
        entry.client = worker
        if self.stop_first and self.calls == 1:
            asyncio.get_running_loop().call_soon(setattr, entry, "client", None)
        return worker


TICKET = SimpleNamespace(retry_after=lambda: 1)


def _run(fleet: Fleet, entry: Entry, deadline_in: float) -> object:
    async def go() -> object:
        state = SimpleNamespace(fleet=fleet)
        loop = asyncio.get_running_loop()
        return await _engine(state, Connected(), entry, TICKET, loop.time() + deadline_in)

    return asyncio.run(go())


def test_a_worker_stopped_before_the_request_ran_is_waited_for_again() -> None:
    entry = Entry()
    first, second = object(), object()
    fleet = Fleet(entry, [first, second], stop_first=True)
    assert _run(fleet, entry, 5) is second
    assert fleet.calls == 2


def test_a_worker_still_the_models_is_handed_over_at_once() -> None:
    entry = Entry()
    only = object()
    fleet = Fleet(entry, [only], stop_first=False)
    assert _run(fleet, entry, 5) is only
    assert fleet.calls == 1


def test_a_wait_past_the_deadline_is_a_503_and_stops_waiting() -> None:
    entry = Entry()
    fleet = Fleet(entry, [object()], stop_first=False, wait=30)  # a load far past the deadline

    async def go() -> tuple[APIError, int]:
        with pytest.raises(APIError) as refused:
            deadline = asyncio.get_running_loop().time() + 0.2
            await _engine(SimpleNamespace(fleet=fleet), Connected(), entry, TICKET, deadline)
        await asyncio.sleep(0)  # a cancellation asked for is delivered by now
        return refused.value, fleet.cancelled  # counted before the loop ends (which cancels)

    refused, cancelled = asyncio.run(go())
    assert (refused.status, refused.code) == (503, "queue_timeout")
    assert cancelled == 1  # the fleet's wait was cancelled, not left running
