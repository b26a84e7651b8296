"""The latency histograms: comparable across load points (shared bins) and readable (whole
request counts on the count axis). Checked on the figure's artists, not on pixels."""

from __future__ import annotations

from datetime import UTC, datetime

import matplotlib.pyplot as plt
import numpy as np
import pytest

from multiserve.bench.client import ClientOptions, RequestRecord
from multiserve.bench.metrics import summarize, tpot
from multiserve.bench.report import latency_figure, shared_bin_edges
from multiserve.bench.runner import BenchResult, LoadPoint, PointResult, RunConfig
from multiserve.bench.workload import make_workload


def record(index: int, ttft: float, e2el: float) -> RequestRecord:
    """A successful 3-token request sent at 0 s, its chunks spread up to `e2el` seconds."""
    chunks = [ttft, (ttft + e2el) / 2, e2el]
    return RequestRecord(index=index, finished=e2el, chunk_times=chunks, output_tokens=3)


def point(load: LoadPoint, records: list[RequestRecord]) -> PointResult:
    return PointResult(
        point=load,
        records=records,
        started=0.0,
        started_at=datetime.now(UTC),
        duration=1.0,
        ended_by="requests",
        stopped_early=None,
        delayed_arrivals=0,
        peak_inflight=load.concurrency or 0,
        summary=summarize(records, 1.0),
    )


def bench_result(*points: list[RequestRecord]) -> BenchResult:
    """A concurrency sweep 1, 2, ... with these requests at each load point."""
    loads = [LoadPoint(i + 1, None) for i in range(len(points))]
    client = ClientOptions(url="http://stub.test", model="m", endpoint="completions")
    cfg = RunConfig(
        client=client,
        workload=make_workload("completions", 4, 3, seed=1),
        points=tuple(loads),
        sweep="concurrency",
    )
    results = [point(load, records) for load, records in zip(loads, points, strict=True)]
    return BenchResult(cfg, datetime.now(UTC), points=results)


@pytest.fixture
def result() -> BenchResult:
    """Two load points whose latencies barely overlap: per-point bins would differ a lot."""
    fast = [record(i, 0.010 + i / 1000, 0.050 + i / 500) for i in range(10)]
    slow = [record(i, 0.100 + i / 200, 0.400 + i / 100) for i in range(10, 16)]
    return bench_result(fast, slow)


def test_shared_bin_edges_span_every_series() -> None:
    edges = shared_bin_edges([[1.0, 2.0], [10.0], []], bins=3)
    assert edges is not None
    assert edges.tolist() == [1.0, 4.0, 7.0, 10.0]
    assert shared_bin_edges([[], []]) is None


def test_latency_histograms_share_bins_across_load_points(result: BenchResult) -> None:
    getters = (lambda r: r.ttft, tpot, lambda r: r.e2el)  # the panels, left to right
    fig = latency_figure(result)
    for ax, getter in zip(fig.axes, getters, strict=True):
        values = [getter(r) * 1000 for p in result.points for r in p.records]
        expected = np.histogram_bin_edges(values, bins=30)
        outlines = ax.patches  # one step outline per load point
        assert len(outlines) == 2, ax.get_title()
        for outline in outlines:
            xs = np.unique(outline.get_xy()[:, 0])
            np.testing.assert_allclose(xs, expected, err_msg=ax.get_title())
    plt.close(fig)


def test_latency_histograms_count_whole_requests() -> None:
    """At most one request per bin: matplotlib's default ticks would be 0, 0.2, 0.4, ..."""
    fig = latency_figure(bench_result([record(i, 0.01 * (i + 1), 0.1 * (i + 1)) for i in range(3)]))
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = ax.get_yticks()
        assert len(ticks) >= 2
        assert all(t == int(t) for t in ticks), (ax.get_title(), ticks)
    plt.close(fig)
