"""How much of the machine was not the benchmark's during a phase: steal and other processes.

Timings on shared CPU machines drift by tens of percent; measuring the CPU time that neither the
benchmark nor its servers used tells a real regression from a busy neighbour. A phase with more
than NOISY_PERCENT of it gets its PASS/MISS marked with NOISY_MARK.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil

NOISY_PERCENT = 5.0
NOISY_MARK = "? (noisy)"


@dataclass
class CpuSample:
    times: Any  # psutil.cpu_times(): the whole machine
    own_s: float  # CPU seconds of this process, its reaped children and the trees sampled live


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by a process and its live children."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process(pid)
        for proc in (parent, *parent.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
    return total


def cpu_sample(*live: int) -> CpuSample:
    """The machine's CPU times and ours: this process, every child it has reaped, and the
    process trees of the `live` pids (a running server and its workers, not reaped yet)."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return CpuSample(psutil.cpu_times(), own + sum(tree_cpu_seconds(pid) for pid in live))


def _cpu_total(times: Any) -> float:
    guest = ("guest", "guest_nice")  # already counted in user and nice on Linux
    return sum(v for k, v in times._asdict().items() if k not in guest)


def interference(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """How much of the machine was not ours between two samples, in percent of all CPU time.

    `steal` is time the hypervisor gave other guests; `others` is CPU used by processes outside
    this benchmark's tree (anything but us, our anchor processes, the servers and their workers).
    """
    total = _cpu_total(after.times) - _cpu_total(before.times)
    if total <= 0:
        return {"steal_percent": 0.0, "others_percent": 0.0}

    def delta(name: str) -> float:
        return getattr(after.times, name, 0.0) - getattr(before.times, name, 0.0)

    steal = delta("steal")
    busy = total - delta("idle") - delta("iowait") - steal
    others = max(0.0, busy - (after.own_s - before.own_s))
    return {"steal_percent": 100.0 * steal / total, "others_percent": 100.0 * others / total}


def others_percent(before: CpuSample, after: CpuSample) -> float:
    """Percent of all CPU time used by other processes or stolen, between two samples."""
    noise = interference(before, after)
    return noise["steal_percent"] + noise["others_percent"]


def is_noisy(noise: Mapping[str, Mapping[str, float]]) -> bool:
    """True when any phase's `interference` exceeds NOISY_PERCENT."""
    return any(n["steal_percent"] + n["others_percent"] > NOISY_PERCENT for n in noise.values())
