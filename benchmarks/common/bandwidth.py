"""How fast this machine's cores can read memory: the ceiling on decoding one stream.

Decoding one token reads every weight once (bar the token embedding's other rows), so a model's
single-stream speed cannot pass `bandwidth / bytes read per token`. The measure is reads only, as
decoding's are: each of `threads` threads reduces its own array, far larger than any cache, with
numpy's vectorised `bitwise_or` (which lets go of the GIL); the median of several passes counts,
as a shared VM's bandwidth moves with its neighbours' load from one second to the next. A
hand-tuned STREAM build may read a few percent faster; the point is the same ceiling on the same
cores the models use.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ARRAY_BYTES = 1 << 30  # per thread: far past the last-level cache of any server CPU
PASSES = 7


def read_bandwidth(threads: int, array_bytes: int = ARRAY_BYTES, passes: int = PASSES) -> float:
    """Bytes per second that `threads` threads read together, median of `passes`."""
    arrays = [np.ones(array_bytes // 8, dtype=np.uint64) for _ in range(threads)]
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            started = time.perf_counter()
            list(pool.map(np.bitwise_or.reduce, arrays))
            rates.append(threads * array_bytes / (time.perf_counter() - started))
    return statistics.median(rates)
