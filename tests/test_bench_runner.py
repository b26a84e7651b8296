"""The load runner against scripted servers (httpx.MockTransport): safety bounds, early stops,
open/closed loop, the precheck, and results files that validate against the package's schema."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from multiserve.bench import command
from multiserve.bench.client import ClientOptions
from multiserve.bench.metrics import SLO
from multiserve.bench.report import result_json
from multiserve.bench.runner import (
    BenchResult,
    BenchRunner,
    BenchSetupError,
    LoadPoint,
    PrecheckResult,
    RunConfig,
    arrival_times,
    precheck,
)
from multiserve.bench.schema import validate
from multiserve.bench.workload import make_workload
from multiserve.cli import build_parser

SSE = {"content-type": "text/event-stream"}


def config(*points: LoadPoint, **kw) -> RunConfig:
    client = ClientOptions(
        url="http://stub.test", model="m", endpoint="completions", api_key="secret", max_retries=0
    )
    workload = make_workload("completions", 4, 3, seed=1)
    return RunConfig(client=client, workload=workload, points=points, **kw)


def run(cfg: RunConfig, handler) -> BenchResult:
    async def go() -> BenchResult:
        return await BenchRunner(cfg, transport=httpx.MockTransport(handler)).run()

    return asyncio.run(go())


class StreamingStub:
    """Streams 3 tokens over `delay` seconds; tracks how many requests are open at once."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay, self.open, self.peak, self.calls = delay, 0, 0, 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        return httpx.Response(200, headers=SSE, content=self._body())

    async def _body(self) -> AsyncIterator[bytes]:
        try:
            for _ in range(3):
                await asyncio.sleep(self.delay / 3)
                yield b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'
        except BaseException:
            self.open -= 1  # cancelled by the client
            raise
        end = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
        self.open -= 1  # the generator is not resumed after its last chunk
        yield f"data: {json.dumps(end)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()


def always_500(request: httpx.Request) -> httpx.Response:
    return httpx.Response(500, json={"error": {"message": "internal error"}})


def test_run_stops_on_error_rate_with_bounded_requests() -> None:
    cfg = config(LoadPoint(4, None), requests=200, warmup=0)
    result = run(cfg, always_500)
    assert result.stopped_early is not None
    assert "error rate 100% over the last 20 requests" in result.stopped_early
    point = result.points[0]
    assert point.ended_by == "stopped"
    sent = [r for r in point.records if r.error.kind != "cancelled"]
    assert 20 <= len(sent) <= 20 + 4  # the window, plus at most what was already in flight
    assert point.summary["errors"] == {"http_5xx": len(sent)}
    data = result_json(result)
    validate(data)
    assert data["stopped_early"] == result.stopped_early
    assert data["failed"] == len(sent)
    assert "secret" not in json.dumps(data)  # the API key is never written


def test_failed_warmup_stops_before_load() -> None:
    result = run(config(LoadPoint(2, None), warmup=2), always_500)
    assert result.stopped_early.startswith("all 2 warmup requests failed (http_5xx")
    assert result.points == []
    assert result.cold_start is not None and not result.cold_start.success
    validate(result_json(result))


def test_closed_loop_keeps_concurrency_and_excludes_warmup() -> None:
    stub = StreamingStub()
    result = run(config(LoadPoint(3, None), requests=12, warmup=2, slo=SLO(e2el_ms=10_000)), stub)
    assert result.stopped_early is None
    assert stub.calls == 14 and stub.peak <= 3
    s = result.points[0].summary
    assert (s["completed"], s["total_output_tokens"], s["output_token_source"]) == (12, 36, "usage")
    assert s["good_completed"] == 12
    assert result.cold_start.success and result.cold_start.ttft is not None
    assert sorted(r.index for r in result.points[0].records) == list(range(2, 14))
    data = result_json(result)
    validate(data)
    assert data["completed"] == 12 and data["warmup"]["requests"] == 2


def test_open_loop_never_exceeds_max_inflight() -> None:
    stub = StreamingStub(delay=0.05)
    cfg = config(LoadPoint(None, float("inf")), requests=10, warmup=0, max_inflight=3)
    result = run(cfg, stub)
    point = result.points[0]
    assert stub.peak <= 3 and point.peak_inflight <= 3
    assert point.delayed_arrivals >= 7  # all arrived at once: the excess waited for a slot
    assert point.summary["completed"] == 10
    data = result_json(result)
    validate(data)
    assert data["request_rate"] == "inf"


def test_duration_bound_cancels_in_flight_requests() -> None:
    stub = StreamingStub(delay=5.0)
    result = run(config(LoadPoint(2, None), requests=50, duration=0.3, warmup=0), stub)
    point = result.points[0]
    assert point.ended_by == "duration"
    assert result.stopped_early is None  # a bound reached is a normal end
    assert point.summary["cancelled"] == 2 and point.summary["failed"] == 0
    assert 0.3 <= point.duration < 2.0
    validate(result_json(result))


def test_sweep_results_validate() -> None:
    stub = StreamingStub()
    cfg = config(LoadPoint(1, None), LoadPoint(2, None), sweep="concurrency", requests=4)
    data = result_json(run(cfg, stub))
    validate(data)
    assert data["sweep"] == {"parameter": "concurrency", "values": [1, 2]}
    assert [p["completed"] for p in data["points"]] == [4, 4]
    assert "completed" not in data  # per point only, for sweeps


def test_unsafe_options_are_refused() -> None:
    with pytest.raises(BenchSetupError, match="exceeds --max-inflight"):
        config(LoadPoint(100, None)).validate()
    with pytest.raises(BenchSetupError):
        config(LoadPoint(None, -1.0)).validate()
    with pytest.raises(BenchSetupError):
        config(LoadPoint(1, None), duration=float("inf")).validate()


def test_arrivals_follow_vllm_gamma_process() -> None:
    times = arrival_times(2000, rate=10.0, burstiness=1.0, seed=0)
    assert times[0] == 0.0
    assert times == arrival_times(2000, rate=10.0, burstiness=1.0, seed=0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.1)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.15)
    bursty = arrival_times(2000, rate=10.0, burstiness=0.25, seed=0)
    bursty_gaps = [b - a for a, b in itertools.pairwise(bursty)]
    assert statistics.mean(bursty_gaps) == pytest.approx(0.1, rel=0.15)  # same mean rate
    assert statistics.stdev(bursty_gaps) / statistics.mean(bursty_gaps) > 1.6  # CV 1/sqrt(0.25)


Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def stub_server(health: int, waiting: int | None, load: StreamingStub | None = None) -> Handler:
    """/health and /stats answered as given; any other request goes to `load` (404 without)."""

    def handler(request: httpx.Request) -> httpx.Response | Awaitable[httpx.Response]:
        assert request.url.host == "stub.test"  # only the given URL
        if request.url.path == "/health":
            return httpx.Response(health, json={"status": "ok"})
        if request.url.path == "/stats" and waiting is not None:
            return httpx.Response(200, json={"models": {"m": {"requests": {"waiting": waiting}}}})
        return load(request) if load is not None else httpx.Response(404)

    return handler


def test_precheck() -> None:
    def check(health: int, waiting: int | None) -> PrecheckResult:
        transport = httpx.MockTransport(stub_server(health, waiting))
        return asyncio.run(precheck(ClientOptions(url="http://stub.test/v1", model="m"), transport))

    down = check(503, None)
    assert not down.ok and "503" in down.message
    busy = check(200, 12)
    assert not busy.ok and busy.waiting == 12 and "12 requests waiting" in busy.message
    assert check(200, 0).ok
    assert check(200, None).ok  # not multiserve: no /stats


@pytest.mark.parametrize(
    ("health", "waiting", "sent"),
    [(503, None, 0), (200, 12, 0), (200, 0, 3)],
    ids=["down", "busy", "healthy"],
)
def test_failed_precheck_sends_no_load(health: int, waiting: int | None, sent: int) -> None:
    stub = StreamingStub()
    cfg = config(LoadPoint(1, None), requests=2, warmup=1, precheck=True)
    result = run(cfg, stub_server(health, waiting, load=stub))
    assert stub.calls == sent  # neither warmup nor load; a healthy server gets both from the stub
    assert (result.stopped_early or "").startswith("precheck:") == (sent == 0)
    validate(result_json(result))


def bench_command(monkeypatch: pytest.MonkeyPatch, handler, *options: str) -> int:
    """`multiserve bench` in-process, its requests answered by `handler` instead of a network."""
    transport = httpx.MockTransport(handler)
    monkeypatch.setattr(command, "BenchRunner", functools.partial(BenchRunner, transport=transport))
    base = ["bench", "--url", "http://stub.test", "--model", "m", "--input-tokens", "4"]
    return command.run_bench(build_parser().parse_args([*base, *options]))


def test_quiet_bench_still_says_how_it_went_and_where_files_are(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    options = ["--sweep-concurrency", "1,2", "--requests", "4", "--quiet"]
    files = ["--out", str(out), "--plot", str(plots)]
    assert bench_command(monkeypatch, StreamingStub(), *options, *files) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing for scripts to parse around
    lines = captured.err.splitlines()
    assert lines[0].startswith("multiserve bench: concurrency 1: 4 ok, 0 failed, ")
    assert lines[1].startswith("multiserve bench: concurrency 2: 4 ok, 0 failed, ")
    assert all("output tok/s, median TTFT " in line for line in lines[:2])
    assert lines[2:] == [
        f"multiserve bench: results written to {out}",
        f"multiserve bench: plot written to {plots / 'latency.png'}",
        f"multiserve bench: plot written to {plots / 'sweep.png'}",
    ]
    assert out.exists() and (plots / "sweep.png").exists()


def test_quiet_bench_that_stopped_says_why_and_that_no_plot_was_made(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    options = ["--warmup", "2", "--quiet", "--out", str(out), "--plot", str(plots)]
    assert bench_command(monkeypatch, always_500, *options) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "multiserve bench: stopped early: all 2 warmup requests failed (http_5xx: internal error)",
        f"multiserve bench: results written to {out}",
        "multiserve bench: no plots written: no load point ran",
    ]


def test_bench_says_where_files_are(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, plots = tmp_path / "[run]" / "r.json", tmp_path / "plots"  # brackets: not rich markup
    options = ["--requests", "3", "--out", str(out), "--plot", str(plots)]
    assert bench_command(monkeypatch, StreamingStub(), *options) == 0
    captured = capsys.readouterr()
    assert "Successful requests" in captured.out  # the table, as before
    assert f"results written to {out}\n" in captured.err
    assert f"plot written to {plots / 'latency.png'}\n" in captured.err
