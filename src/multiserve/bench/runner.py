"""Drive the load: closed loop at a concurrency, or open loop at a request rate, with hard bounds.

Safety first, because a load tester pointed at the wrong server must not take it down:

* At most `max_inflight` requests are ever in flight (default 64), whatever the mode. In open
  loop an arrival that finds every slot taken waits for one (counted as `delayed_arrivals`),
  so an overloaded server turns the run into a closed loop at the cap instead of a pile-up.
* Every run point is bounded by `requests` and by `duration` seconds; on the duration bound the
  requests still in flight are cancelled (recorded as `cancelled`, not as failures).
* When more than `max_error_rate` of the last `error_window` requests failed, the run stops,
  says why, and a sweep does not go on to heavier load points.
* Refused requests (429/503) are retried only as the client's backoff allows (see client.py).
* Only the given `--url` is ever contacted (client and precheck share its base).

Open-loop arrivals follow vLLM: gaps drawn from a gamma distribution with shape = burstiness
and scale = 1 / (rate * burstiness), i.e. Poisson arrivals at burstiness 1; the first request
goes at once. Arrival times are absolute from the point's start, so a slow send does not
shift the rest of the schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import httpx

from multiserve.bench.client import (
    BenchClient,
    ClientOptions,
    RequestError,
    RequestRecord,
    server_root,
)
from multiserve.bench.metrics import SLO, error_rate, summarize
from multiserve.bench.workload import Workload

PRECHECK_MAX_WAITING = 8  # requests already queued for the model before we refuse to add load
DEFAULT_REQUESTS = 200
DEFAULT_DURATION = 300.0
DEFAULT_MAX_INFLIGHT = 64


class BenchSetupError(ValueError):
    """Options that cannot make a safe run."""


@dataclass(frozen=True)
class LoadPoint:
    """One load level: closed loop (rate None) at `concurrency`, or open loop at `rate` req/s
    with `concurrency` (if given) as an extra in-flight cap, like vLLM's --max-concurrency."""

    concurrency: int | None
    rate: float | None
    burstiness: float = 1.0

    @property
    def label(self) -> str:
        if self.rate is None:
            return f"concurrency {self.concurrency}"
        rate = "inf" if math.isinf(self.rate) else f"{self.rate:g}"
        cap = f", concurrency ≤ {self.concurrency}" if self.concurrency else ""
        return f"rate {rate} req/s{cap}"


@dataclass(frozen=True)
class RunConfig:
    client: ClientOptions
    workload: Workload
    points: tuple[LoadPoint, ...]
    sweep: Literal["concurrency", "rate"] | None = None
    requests: int = DEFAULT_REQUESTS
    duration: float = DEFAULT_DURATION
    warmup: int = 1
    seed: int = 0
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_error_rate: float = 0.5
    error_window: int = 20
    precheck: bool = False
    slo: SLO | None = None

    def validate(self) -> None:
        if not self.points:
            raise BenchSetupError("nothing to run")
        if self.requests < 1:
            raise BenchSetupError("--requests must be at least 1")
        if not 0 < self.duration < math.inf:
            raise BenchSetupError("--duration must be a positive number of seconds")
        if self.warmup < 0:
            raise BenchSetupError("--warmup cannot be negative")
        if self.max_inflight < 1:
            raise BenchSetupError("--max-inflight must be at least 1")
        if not 0 <= self.max_error_rate <= 1:
            raise BenchSetupError("--max-error-rate must be between 0 and 1")
        if self.error_window < 1:
            raise BenchSetupError("the error window must hold at least one request")
        if self.client.endpoint != self.workload.endpoint:
            raise BenchSetupError("the client's and the workload's endpoints differ")
        for point in self.points:
            if point.concurrency is not None and point.concurrency < 1:
                raise BenchSetupError("concurrency must be at least 1")
            if point.concurrency is not None and point.concurrency > self.max_inflight:
                raise BenchSetupError(
                    f"concurrency {point.concurrency} exceeds --max-inflight {self.max_inflight}"
                    " (raise --max-inflight if the server can take it)"
                )
            if point.rate is not None and not point.rate > 0:
                raise BenchSetupError("--rate must be positive (inf sends as fast as slots allow)")
            if not point.burstiness > 0 or math.isinf(point.burstiness):
                raise BenchSetupError("--burstiness must be a positive number")


@dataclass
class ColdStart:
    """The very first request of a run: model load, cache warm-up and connection set-up."""

    success: bool
    ttft: float | None
    e2el: float
    error: RequestError | None


@dataclass
class PrecheckResult:
    ok: bool
    message: str
    health_status: int | None = None
    waiting: int | None = None


@dataclass
class PointResult:
    point: LoadPoint
    records: list[RequestRecord]
    started: float  # perf_counter
    started_at: datetime
    duration: float
    ended_by: Literal["requests", "duration", "stopped"]
    stopped_early: str | None
    delayed_arrivals: int
    peak_inflight: int
    summary: dict[str, Any]


@dataclass
class BenchResult:
    config: RunConfig
    started_at: datetime
    finished_at: datetime | None = None
    precheck: PrecheckResult | None = None
    warmup_records: list[RequestRecord] = field(default_factory=list)
    cold_start: ColdStart | None = None
    points: list[PointResult] = field(default_factory=list)
    stopped_early: str | None = None


class Progress(Protocol):
    """What the runner tells a display (report.LiveProgress, or nothing)."""

    def start(self, label: str, total: int) -> None: ...

    def advance(self, record: RequestRecord) -> None: ...

    def stop(self) -> None: ...


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start at which each of n requests arrives (vLLM's gamma process)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    times, now = [], 0.0
    for _ in range(n):
        times.append(now)
        now += rng.gammavariate(burstiness, scale)
    return times


def _cancelled(index: int, started: float) -> RequestRecord:
    now = time.perf_counter()
    return RequestRecord(
        index=index,
        sent=started,
        first_sent=started,
        finished=now,
        error=RequestError("cancelled", "run stopped while the request was in flight"),
    )


class _PointRun:
    """One load point: a dispatcher task issuing requests under a slot semaphore."""

    def __init__(
        self,
        bench: BenchRunner,
        point: LoadPoint,
        first_index: int,
        seed: int,
    ) -> None:
        self.bench, self.point, self.first_index, self.seed = bench, point, first_index, seed
        cfg = bench.config
        limit = cfg.max_inflight
        if point.concurrency is not None:
            limit = min(limit, point.concurrency)
        self.slots = asyncio.Semaphore(limit)
        self.records: list[RequestRecord] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.inflight = 0
        self.peak_inflight = 0
        self.delayed = 0
        self.stop_reason: str | None = None
        self.ended_by: Literal["requests", "duration", "stopped"] = "requests"
        self.dispatcher: asyncio.Task[None] | None = None

    def stop(self, reason: str | None, ended_by: Literal["duration", "stopped"]) -> None:
        if self.ended_by == "requests":
            self.ended_by, self.stop_reason = ended_by, reason
        if self.dispatcher is not None:
            self.dispatcher.cancel()
        for task in self.tasks:
            task.cancel()

    async def run(self) -> PointResult:
        cfg = self.bench.config
        started_at = datetime.now(UTC)
        self.started = time.perf_counter()
        loop = asyncio.get_running_loop()
        self.dispatcher = asyncio.create_task(self._dispatch())
        timer = loop.call_later(
            cfg.duration, self.stop, f"--duration {cfg.duration:g}s reached", "duration"
        )
        self.bench._current = self
        try:
            await asyncio.wait({self.dispatcher})
            if self.tasks:
                await asyncio.wait(set(self.tasks))
        finally:
            timer.cancel()
            self.bench._current = None
        duration = time.perf_counter() - self.started
        self.records.sort(key=lambda r: r.index)
        stopped = self.stop_reason if self.ended_by == "stopped" else None
        return PointResult(
            point=self.point,
            records=self.records,
            started=self.started,
            started_at=started_at,
            duration=duration,
            ended_by=self.ended_by,
            stopped_early=stopped,
            delayed_arrivals=self.delayed,
            peak_inflight=self.peak_inflight,
            summary=summarize(self.records, duration, cfg.slo),
        )

    async def _dispatch(self) -> None:
        cfg = self.bench.config
        point = self.point
        arrivals = (
            arrival_times(cfg.requests, point.rate, point.burstiness, self.seed)
            if point.rate is not None
            else None
        )
        blocked_until = 0.0  # when the last wait for a free slot ended
        for k in range(cfg.requests):
            if arrivals is not None:
                due = self.started + arrivals[k]
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.slots.locked():
                    self.delayed += 1
                    await self.slots.acquire()
                    blocked_until = time.perf_counter()
                    self._launch(self.first_index + k)
                    continue
                if due < blocked_until:  # it fell due while an earlier arrival waited
                    self.delayed += 1
            await self.slots.acquire()
            self._launch(self.first_index + k)

    def _launch(self, index: int) -> None:
        task = asyncio.create_task(self._one(index))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, index: int) -> None:
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        started = time.perf_counter()
        try:
            prompt = self.bench.config.workload.prompt(index)
            record = await self.bench.client.send(index, prompt)
        except asyncio.CancelledError:
            record = _cancelled(index, started)
        finally:
            self.inflight -= 1
            self.slots.release()
        self.records.append(record)
        self.bench._advance(record)
        if record.error is None or record.error.kind != "cancelled":
            self._check_errors()

    def _check_errors(self) -> None:
        cfg = self.bench.config
        judged = [r for r in self.records if r.error is None or r.error.kind != "cancelled"]
        window = judged[-cfg.error_window :]
        if len(window) < cfg.error_window:
            return
        rate = error_rate(window)
        if rate > cfg.max_error_rate:
            kinds = sorted({r.error.kind for r in window if r.error is not None})
            self.stop(
                f"error rate {rate:.0%} over the last {len(window)} requests exceeds "
                f"--max-error-rate {cfg.max_error_rate:g} ({', '.join(kinds)})",
                "stopped",
            )


class BenchRunner:
    """Runs a whole benchmark: precheck, warmup (cold start), then each load point in turn."""

    def __init__(
        self,
        config: RunConfig,
        progress: Progress | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.progress = progress
        self.transport = transport
        self.log = log or (lambda _msg: None)
        self.client: BenchClient  # set in run()
        self._current: _PointRun | None = None
        self._warmup_task: asyncio.Task[None] | None = None
        self._stop_reason: str | None = None

    def request_stop(self, reason: str = "interrupted") -> None:
        """Stop as soon as possible (e.g. on Ctrl-C); results so far are kept."""
        self._stop_reason = self._stop_reason or reason
        if self._current is not None:
            self._current.stop(reason, "stopped")
        if self._warmup_task is not None:
            self._warmup_task.cancel()

    def _advance(self, record: RequestRecord) -> None:
        if self.progress is not None:
            self.progress.advance(record)

    async def run(self) -> BenchResult:
        cfg = self.config
        result = BenchResult(config=cfg, started_at=datetime.now(UTC))
        try:
            if cfg.precheck:
                result.precheck = await precheck(cfg.client, self.transport)
                if not result.precheck.ok:
                    result.stopped_early = f"precheck: {result.precheck.message}"
                    return result
            options = dataclasses.replace(cfg.client, max_connections=cfg.max_inflight)
            async with BenchClient(
                options, self.transport, rng=random.Random(cfg.seed)
            ) as self.client:
                await self._warmup(result)
                if result.stopped_early is None:
                    await self._points(result)
        finally:
            result.finished_at = datetime.now(UTC)
        return result

    async def _warmup(self, result: BenchResult) -> None:
        """Sequential requests, excluded from the results; the first is the cold start."""
        cfg = self.config
        if cfg.warmup == 0:
            return
        if self.progress is not None:
            self.progress.start("warmup", cfg.warmup)

        async def requests() -> None:
            for index in range(cfg.warmup):
                record = await self.client.send(index, cfg.workload.prompt(index))
                result.warmup_records.append(record)
                self._advance(record)

        self._warmup_task = asyncio.create_task(requests())
        try:
            await asyncio.wait({self._warmup_task}, timeout=cfg.duration)
            if not self._warmup_task.done():
                self._warmup_task.cancel()
                self._stop_reason = self._stop_reason or (
                    f"warmup did not finish within --duration {cfg.duration:g}s"
                )
                await asyncio.wait({self._warmup_task})
        finally:
            self._warmup_task = None
            if self.progress is not None:
                self.progress.stop()
        if result.warmup_records:
            first = result.warmup_records[0]
            result.cold_start = ColdStart(first.success, first.ttft, first.e2el, first.error)
        if self._stop_reason:
            result.stopped_early = self._stop_reason
        elif not any(r.success for r in result.warmup_records):
            error = result.warmup_records[-1].error
            detail = f"{error.kind}: {error.message}" if error else "?"
            result.stopped_early = f"all {cfg.warmup} warmup requests failed ({detail})"

    async def _points(self, result: BenchResult) -> None:
        cfg = self.config
        for number, point in enumerate(cfg.points):
            if self._stop_reason:
                result.stopped_early = self._stop_reason
                return
            if self.progress is not None:
                self.progress.start(point.label, cfg.requests)
            first_index = cfg.warmup + number * cfg.requests
            run = _PointRun(self, point, first_index, seed=cfg.seed + number)
            try:
                outcome = await run.run()
            finally:
                if self.progress is not None:
                    self.progress.stop()
            result.points.append(outcome)
            if outcome.stopped_early:
                result.stopped_early = outcome.stopped_early
                if number + 1 < len(cfg.points):
                    self.log("sweep stopped: later (heavier) load points were not run")
                return


async def precheck(
    options: ClientOptions, transport: httpx.AsyncBaseTransport | None = None
) -> PrecheckResult:
    """GET /health must answer 200; a multiserve /stats must not show a deep queue already."""
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    async with httpx.AsyncClient(
        base_url=server_root(options.url),
        headers=headers,
        timeout=min(options.timeout, 10.0),
        trust_env=False,
        follow_redirects=False,
        transport=transport,
    ) as http:
        try:
            health = await http.get("/health")
        except httpx.HTTPError as exc:
            return PrecheckResult(False, f"GET /health failed: {type(exc).__name__}: {exc}")
        if health.status_code != 200:
            return PrecheckResult(
                False, f"GET /health answered {health.status_code}", health.status_code
            )
        waiting: int | None = None
        with contextlib.suppress(httpx.HTTPError, ValueError, TypeError, AttributeError):
            stats = await http.get("/stats")
            if stats.status_code == 200:
                models = stats.json().get("models", {})
                model = models.get(options.model) if isinstance(models, dict) else None
                if isinstance(model, dict):
                    waiting = int(model["requests"]["waiting"])
        if waiting is not None and waiting > PRECHECK_MAX_WAITING:
            return PrecheckResult(
                False,
                f"model `{options.model}` already has {waiting} requests waiting "
                f"(more than {PRECHECK_MAX_WAITING}); not adding load",
                200,
                waiting,
            )
        note = "" if waiting is None else f", {waiting} waiting"
        return PrecheckResult(True, f"healthy{note}", 200, waiting)
