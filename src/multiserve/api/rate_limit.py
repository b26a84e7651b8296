"""Per-client request rate limits: a token bucket per API key (or per address without keys).

Admission control protects the server from overload; this protects the other clients from one
client: a key holder that loops requests gets 429 with Retry-After while everyone else is served.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_TRACKED_CLIENTS = 100_000  # beyond it the longest-idle buckets are forgotten (they were full)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`per_minute` requests a minute per client, in bursts of up to `burst` (by default ten
    seconds' worth)."""

    def __init__(self, per_minute: int, burst: int | None = None) -> None:
        self.rate = per_minute / 60.0
        self.burst = burst or max(1, per_minute // 6)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def wait_needed(self, client: str, now: float | None = None) -> float:
        """Take a request from `client`'s bucket: 0 if allowed, else seconds until it would be."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.pop(client, None) or _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        self._buckets[client] = bucket  # most recently used last
        if len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


def client_identity(key_index: int | None, address: str | None) -> str:
    """Who a request counts against: the API key it was let in with, else its address (a
    header the server does not check must not buy a fresh bucket)."""
    return f"key:{key_index}" if key_index is not None else f"addr:{address}"


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
