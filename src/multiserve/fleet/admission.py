"""Admission: each model takes a bounded number of requests (loading, queued or running).

A request over the bound is refused at once with 503 and a Retry-After derived from how long
requests have recently held their place. The check and the increment happen with no await in
between, so a burst on the event loop can never over-admit. A request with several prompts takes
one place per prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class Overloaded(Exception):
    """The model's queue is full."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("queue full")
        self.retry_after = retry_after


class Ticket:
    """One admitted request's place; `release` is idempotent."""

    def __init__(self, admission: Admission, places: int) -> None:
        self._admission = admission
        self._places = places
        self._started = time.monotonic()
        self._released = False

    def retry_after(self) -> int:
        return self._admission.retry_after()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._leave(self._places, time.monotonic() - self._started)


class Admission:
    """Counts one model's requests in the system against `slots + queue_limit`."""

    SMOOTHING = 0.2

    def __init__(
        self, slots: int, queue_limit: int, on_leave: Callable[[], None] = lambda: None
    ) -> None:
        self.capacity = slots + queue_limit
        self.in_system = 0
        self._mean_hold = 1.0  # seconds; smoothed over recent requests
        self._on_leave = on_leave
        self.last_used = time.monotonic()

    def enter(self, places: int = 1) -> Ticket:
        """A ticket for `places` requests (raises Overloaded when they do not fit now)."""
        if self.in_system + places > self.capacity:
            raise Overloaded(self.retry_after())
        self.in_system += places
        self.last_used = time.monotonic()
        return Ticket(self, places)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: about how long recent requests stayed.

        Their stay already includes their own wait in the queue, so it is not scaled by depth.
        """
        return max(1, min(60, math.ceil(self._mean_hold)))

    def _leave(self, places: int, held: float) -> None:
        self.in_system -= places
        self.last_used = time.monotonic()
        self._mean_hold += self.SMOOTHING * (held - self._mean_hold)
        self._on_leave()
