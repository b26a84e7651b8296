"""The per-client token bucket, on a clock the test controls."""

from __future__ import annotations

from multiserve.api.rate_limit import RateLimiter, client_identity, retry_after_header


def test_burst_then_the_rate() -> None:
    limiter = RateLimiter(per_minute=60, burst=3)
    assert [limiter.wait_needed("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_needed("a", now=0.0) == 1.0  # one token a second
    assert limiter.wait_needed("a", now=0.5) == 0.5  # a refused try takes nothing
    assert limiter.wait_needed("a", now=1.0) == 0.0
    assert limiter.wait_needed("b", now=1.0) == 0.0  # every client has its own bucket


def test_idle_clients_refill_only_up_to_the_burst() -> None:
    limiter = RateLimiter(per_minute=6, burst=2)
    assert limiter.wait_needed("a", now=0.0) == 0.0
    assert [limiter.wait_needed("a", now=3600.0) for _ in range(2)] == [0.0, 0.0]
    assert limiter.wait_needed("a", now=3600.0) == 10.0


def test_clients_are_their_keys_else_their_addresses() -> None:
    assert client_identity(0, "10.0.0.1") == client_identity(0, "10.0.0.2")
    assert client_identity(0, "10.0.0.1") != client_identity(1, "10.0.0.1")
    assert client_identity(None, "10.0.0.1") != client_identity(None, "10.0.0.2")
    assert retry_after_header(0.2) == "1"
    assert retry_after_header(2.5) == "3"
