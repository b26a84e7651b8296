"""The API process's end of a worker's connection (backends/worker_process.WorkerLink): cutting
it must end it even when the peer has gone silent, as a node that vanished does (no FIN)."""

from __future__ import annotations

import asyncio
import socket
from multiprocessing.connection import Connection

from multiserve.backends.worker_process import WorkerLink


def test_cutting_a_link_to_a_silent_peer_ends_it_at_once() -> None:
    ours, silent = socket.socketpair()  # the peer never writes nor closes

    async def cut() -> list[object]:
        loop = asyncio.get_running_loop()
        ended = asyncio.Event()
        link = WorkerLink(Connection(ours.detach()), loop, lambda _: None, lambda _: ended.set())
        await asyncio.sleep(0.1)  # the reader is blocked in recv now
        link.close()
        await asyncio.wait_for(ended.wait(), 5)
        return ["ended"]

    try:
        assert asyncio.run(cut()) == ["ended"]
    finally:
        silent.close()


def test_messages_reach_the_loop_in_order_and_the_peer_closing_ends_the_link() -> None:
    ours, theirs = socket.socketpair()
    peer = Connection(theirs.detach())

    async def run() -> list[object]:
        loop = asyncio.get_running_loop()
        seen: list[object] = []
        ended = asyncio.Event()
        WorkerLink(Connection(ours.detach()), loop, seen.append, lambda _: ended.set())
        for i in range(3):
            peer.send(i)
        peer.close()
        await asyncio.wait_for(ended.wait(), 5)
        return seen

    assert asyncio.run(run()) == [0, 1, 2]
