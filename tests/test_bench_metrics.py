"""The benchmark maths on scripted requests: known TTFT/TPOT/ITL/E2EL, percentiles, goodput."""

from __future__ import annotations

import random

import numpy as np
import pytest

from multiserve.bench.client import RequestError, RequestRecord
from multiserve.bench.metrics import (
    SLO,
    distribution,
    error_rate,
    parse_slo,
    percentile,
    summarize,
    tpot,
)


def ok(
    index: int, sent: float, chunks: list[float], end: float, tokens: int, **kw
) -> RequestRecord:
    return RequestRecord(
        index=index,
        sent=sent,
        first_sent=sent,
        finished=end,
        chunk_times=chunks,
        output_tokens=tokens,
        output_token_source=kw.get("source", "usage"),
        input_tokens=kw.get("input_tokens", 10),
        input_token_source="usage",
    )


def failed(index: int, kind: str = "http_5xx", status: int | None = 500) -> RequestRecord:
    return RequestRecord(index=index, sent=0.5, finished=0.6, error=RequestError(kind, "x", status))


def scripted() -> list[RequestRecord]:
    return [
        # TTFT 100 ms, chunks 50 and 100 ms apart, E2EL 300 ms, 3 tokens: TPOT 100 ms.
        ok(0, 0.0, [0.1, 0.15, 0.25], 0.3, 3),
        # One token: TTFT = E2EL = 200 ms; no TPOT, no ITL.
        ok(1, 1.0, [1.2], 1.2, 1),
        failed(2),
    ]


def test_per_request_values() -> None:
    first, second, _ = scripted()
    assert first.ttft == pytest.approx(0.1)
    assert first.itl == pytest.approx([0.05, 0.1])
    assert first.e2el == pytest.approx(0.3)
    assert tpot(first) == pytest.approx(0.1)
    assert tpot(second) is None


def test_summary_of_scripted_records() -> None:
    s = summarize(scripted(), duration=2.0)
    assert s["completed"] == 2
    assert s["failed"] == 1
    assert s["total_input_tokens"] == 20
    assert s["total_output_tokens"] == 4
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(2.0)
    assert s["total_token_throughput"] == pytest.approx(12.0)
    assert s["mean_ttft_ms"] == pytest.approx(150)
    assert s["median_ttft_ms"] == pytest.approx(150)
    assert s["std_ttft_ms"] == pytest.approx(50)  # population std, like numpy.std
    assert s["p99_ttft_ms"] == pytest.approx(199)
    assert s["max_ttft_ms"] == pytest.approx(200)
    assert s["mean_tpot_ms"] == pytest.approx(100)  # the one-token request is left out
    assert s["p90_tpot_ms"] == pytest.approx(100)
    assert s["mean_itl_ms"] == pytest.approx(75)
    assert s["p95_itl_ms"] == pytest.approx(97.5)
    assert s["mean_e2el_ms"] == pytest.approx(250)
    assert s["max_e2el_ms"] == pytest.approx(300)
    assert s["errors"] == {"http_5xx": 1}
    assert s["error_statuses"] == {"500": 1}
    assert s["output_token_source"] == "usage"
    assert s["request_goodput"] is None  # no SLO given


def test_no_samples_give_nulls_not_zeros() -> None:
    s = summarize([failed(0)], duration=1.0)
    assert s["completed"] == 0
    assert s["mean_ttft_ms"] is None
    assert s["p99_itl_ms"] is None
    assert s["output_token_source"] is None
    assert summarize([], duration=0.0)["request_throughput"] == 0.0


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        (SLO(ttft_ms=150), 1),  # only the 100 ms TTFT
        (SLO(tpot_ms=50), 1),  # the 1-token request counts as TPOT 0 (as in vLLM)
        (SLO(e2el_ms=250), 1),
        (SLO(ttft_ms=250, e2el_ms=350), 2),
        (SLO(ttft_ms=150, e2el_ms=250), 0),  # every given target must be met
    ],
)
def test_goodput_under_slos(slo: SLO, good: int) -> None:
    s = summarize(scripted(), duration=2.0, slo=slo)
    assert s["good_completed"] == good
    assert s["request_goodput"] == pytest.approx(good / 2.0)


def test_percentiles_match_numpy() -> None:
    rng = random.Random(3)
    for n in (1, 2, 7, 100):
        data = sorted(rng.uniform(0, 1000) for _ in range(n))
        for q in (0, 50, 90, 95, 99, 100):
            assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))
        stats = distribution(data)
        assert stats["std"] == pytest.approx(float(np.std(data)))
        assert stats["median"] == pytest.approx(float(np.median(data)))


def test_token_source_is_marked() -> None:
    usage = ok(0, 0.0, [0.1, 0.2], 0.3, 2)
    chunks = ok(1, 0.0, [0.1, 0.2], 0.3, 2, source="chunks")
    assert summarize([chunks], 1.0)["output_token_source"] == "chunks"
    mixed = summarize([usage, chunks], 1.0)
    assert mixed["output_token_source"] == "mixed"
    assert mixed["output_token_sources"] == {"usage": 1, "chunks": 1}


def test_cancelled_requests_are_not_failures() -> None:
    cancelled = failed(5, kind="cancelled", status=None)
    s = summarize([*scripted(), cancelled], duration=2.0)
    assert (s["failed"], s["cancelled"]) == (1, 1)
    assert error_rate([*scripted(), cancelled]) == pytest.approx(1 / 3)


def test_parse_slo() -> None:
    assert parse_slo("ttft:500,tpot:50") == SLO(ttft_ms=500, tpot_ms=50)
    assert parse_slo("e2el:3000 ttft:1") == SLO(ttft_ms=1, e2el_ms=3000)
    for bad in ("", "ttft", "itl:5", "ttft:-1", "ttft:abc"):
        with pytest.raises(ValueError):
            parse_slo(bad)
