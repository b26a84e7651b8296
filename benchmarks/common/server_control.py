"""Bringing a running multiserve to a known state between measurements: idle, and unloaded.

A measurement that starts while the server is still starting its spare worker, or while a model
it just let go of is still exiting, charges that work to whatever it times.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import psutil

from benchmarks.common.noise import tree_cpu_seconds
from benchmarks.common.servers import RunningServer

SPARE_WARMUP_S = 2.0  # after /health or an unload, let a spare worker start and import
SETTLE_TIMEOUT_S = 20.0
SETTLE_CPU_SHARE = 0.05  # the server's process tree counts as idle below 5% of one core


def worker_processes(pid: int) -> int:
    """The server's spawned worker processes (loaded models and the spare), not its helpers."""
    count = 0
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children():
            with contextlib.suppress(psutil.Error):
                count += "spawn_main" in " ".join(child.cmdline())
    return count


async def settle(server: RunningServer, workers: int, floor_s: float = SPARE_WARMUP_S) -> float:
    """Wait `floor_s`, then until `workers` worker processes exist and the server is idle.

    The server may start its next spare a few seconds after a load; waiting for the process
    (not a fixed time) keeps a booting spare from competing with the anchor or the next load.
    """
    start = time.perf_counter()
    await asyncio.sleep(floor_s)
    interval = 0.25
    while time.perf_counter() - start < SETTLE_TIMEOUT_S:
        before = tree_cpu_seconds(server.proc.pid)
        await asyncio.sleep(interval)
        idle = tree_cpu_seconds(server.proc.pid) - before < SETTLE_CPU_SHARE * interval
        if idle and worker_processes(server.proc.pid) >= workers:
            return time.perf_counter() - start
    raise TimeoutError(f"no idle spare worker after {SETTLE_TIMEOUT_S:.0f}s")


async def unload(client: httpx.AsyncClient, model: str) -> None:
    """Unload `model` (the server answers once its worker has stopped)."""
    response = await client.post(f"/v1/models/{model}/unload")
    if response.status_code != 200:
        raise RuntimeError(f"unload {model}: HTTP {response.status_code}: {response.text[:300]}")


async def unload_all(client: httpx.AsyncClient) -> None:
    """Unload every loaded model (pinned ones too): the server as after a restart."""
    states = (await client.get("/health")).json()["models"]
    for model, state in states.items():
        if state == "loaded":
            await unload(client, model)
