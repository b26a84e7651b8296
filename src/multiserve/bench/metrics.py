"""Pure functions from per-request records to vLLM `bench serve`-style summary numbers.

Definitions (as in vLLM's benchmark_serving.py):

* TTFT: send to the first streamed chunk carrying generated text.
* E2EL: send to the end of the stream.
* TPOT: per request, (E2EL - TTFT) / (output_tokens - 1); requests with one token or fewer are
  left out of the TPOT distribution (and count as TPOT 0 for goodput, like vLLM).
* ITL: every gap between successive content chunks, all requests pooled.
* Throughputs divide by the run's `duration` (first send to the last request's end).
* Statistics: mean, median, population std, p90/p95/p99 (linear interpolation, numpy's
  default) and max, in milliseconds; `null` when there is no sample at all (vLLM reports 0).

Only successful requests enter latencies and token totals; failures are counted by kind.
Latencies time the attempt that succeeded; time spent refused (429/503) and backing off is
reported separately (`refusals`, `retry_wait_s`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from multiserve.bench.client import RequestRecord

STATS = ("mean", "median", "std", "p90", "p95", "p99", "max")
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class SLO:
    """Goodput targets in milliseconds; a request is good when it meets every given one."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))

    def as_dict(self) -> dict[str, float]:
        pairs = {"ttft": self.ttft_ms, "tpot": self.tpot_ms, "e2el": self.e2el_ms}
        return {k: v for k, v in pairs.items() if v is not None}


def parse_slo(text: str) -> SLO:
    """`ttft:500,tpot:50,e2el:3000` (any subset; commas or spaces) into an SLO."""
    values: dict[str, float] = {}
    for item in text.replace(",", " ").split():
        name, sep, number = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--slo: expected ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"--slo: {name} needs milliseconds, got {number!r}") from None
        if not value > 0 or math.isinf(value):
            raise ValueError(f"--slo: {name} must be a positive number of milliseconds")
        values[f"{name}_ms"] = value
    if not values:
        raise ValueError("--slo: give at least one of ttft:MS, tpot:MS, e2el:MS")
    return SLO(**values)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy.percentile's default method)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def distribution(values: Iterable[float]) -> dict[str, float | None]:
    """mean/median/std/p90/p95/p99/max of values (same unit in and out)."""
    data = sorted(values)
    if not data:
        return dict.fromkeys(STATS)
    mean = math.fsum(data) / len(data)
    variance = math.fsum((v - mean) ** 2 for v in data) / len(data)
    return {
        "mean": mean,
        "median": percentile(data, 50),
        "std": math.sqrt(variance),
        "p90": percentile(data, 90),
        "p95": percentile(data, 95),
        "p99": percentile(data, 99),
        "max": data[-1],
    }


def tpot(record: RequestRecord) -> float | None:
    """Seconds per output token after the first; None below two tokens or without a TTFT."""
    ttft = record.ttft
    if ttft is None or record.output_tokens <= 1:
        return None
    return (record.e2el - ttft) / (record.output_tokens - 1)


def is_good(record: RequestRecord, slo: SLO) -> bool:
    """vLLM's goodput test for one successful request (TPOT 0 when it is undefined)."""
    ttft = record.ttft if record.ttft is not None else record.e2el
    checks = (
        (slo.ttft_ms, ttft),
        (slo.tpot_ms, tpot(record) or 0.0),
        (slo.e2el_ms, record.e2el),
    )
    return all(limit is None or value * 1000 <= limit for limit, value in checks)


def _source(counts: Counter[str]) -> str | None:
    if not counts:
        return None
    return next(iter(counts)) if len(counts) == 1 else "mixed"


def summarize(
    records: Sequence[RequestRecord], duration: float, slo: SLO | None = None
) -> dict[str, Any]:
    """The summary of one run (one sweep point) under vLLM's field names."""
    ok = [r for r in records if r.success]
    cancelled = [r for r in records if r.error is not None and r.error.kind == "cancelled"]
    failed = [r for r in records if r.error is not None and r.error.kind != "cancelled"]
    total_in = sum(r.input_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)

    samples_s = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for t in map(tpot, ok) if t is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2el for r in ok],
    }
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(failed),
        "cancelled": len(cancelled),
        "duration": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_second(len(ok)),
        "request_goodput": None,
        "good_completed": None,
        "output_throughput": per_second(total_out),
        "total_token_throughput": per_second(total_in + total_out),
    }
    if slo:
        good = sum(is_good(r, slo) for r in ok)
        summary["good_completed"] = good
        summary["request_goodput"] = per_second(good)
    for name, values in samples_s.items():
        stats = distribution(v * 1000 for v in values)
        for stat in STATS:
            summary[f"{stat}_{name}_ms"] = stats[stat]
    out_sources = Counter(r.output_token_source for r in ok)
    in_sources = Counter(r.input_token_source for r in ok)
    summary.update(
        output_token_source=_source(out_sources),
        output_token_sources=dict(out_sources),
        input_token_source=_source(in_sources),
        errors=dict(Counter(r.error.kind for r in failed)),
        error_statuses={
            str(k): v for k, v in Counter(r.error.status for r in failed if r.error.status).items()
        },
        refusals=sum(r.refusals for r in records),
        retry_wait_s=sum(r.retry_wait for r in records),
    )
    return summary


def error_rate(records: Sequence[RequestRecord]) -> float:
    """Share of failed requests (cancelled ones are not judged)."""
    judged = [r for r in records if r.error is None or r.error.kind != "cancelled"]
    if not judged:
        return 0.0
    return sum(not r.success for r in judged) / len(judged)
