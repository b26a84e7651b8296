"""Request metrics: Prometheus series with vLLM-style names, and the JSON behind `/stats`.

Latencies are observed in the API process, where the client's view of time is: from request
arrival to first token (TTFT), between token deliveries (ITL) and to the end (E2E).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from multiserve.api.formats import Usage
from multiserve.backends.client import ReplicaView
from multiserve.fleet.manager import Fleet, ModelEntry

WINDOW = 1024  # latest requests /stats summarises
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)


@dataclass
class ModelStats:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    refused: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    embedded_inputs: int = 0
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    itl: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW * 16))
    e2e: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))


def _summary(values: deque[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 6)

    return {
        "count": len(ordered),
        "mean": round(statistics.fmean(ordered), 6),
        "p50": pick(0.5),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": round(ordered[-1], 6),
    }


class Metrics:
    """All request metrics of one server."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.registry = CollectorRegistry()
        reg, label = self.registry, ["model_name"]
        self.ttft = Histogram(
            "multiserve:time_to_first_token_seconds",
            "Time from request arrival to its first token.",
            label,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "multiserve:inter_token_latency_seconds",
            "Time between two deliveries of tokens of one request.",
            label,
            buckets=_TOKEN_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "multiserve:e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            label,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "multiserve:prompt_tokens", "Prompt tokens processed.", label, registry=reg
        )
        self.generation_tokens = Counter(
            "multiserve:generation_tokens", "Tokens generated.", label, registry=reg
        )
        self.embedded_inputs = Counter(
            "multiserve:embedding_inputs",
            "Inputs embedded (their tokens count as prompt tokens).",
            label,
            registry=reg,
        )
        self.cache_queries = Counter(
            "multiserve:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (all of every finished request's).",
            label,
            registry=reg,
        )
        self.cache_hits = Counter(
            "multiserve:prefix_cache_hits",
            "Prompt tokens taken from the prefix cache instead of being computed.",
            label,
            registry=reg,
        )
        self.finished = Counter(
            "multiserve:request_success",
            "Requests finished, by reason.",
            [*label, "finished_reason"],
            registry=reg,
        )
        self.failed = Counter(
            "multiserve:request_failure",
            "Requests that ended in an error.",
            [*label, "kind"],
            registry=reg,
        )
        self.running = Gauge(
            "multiserve:num_requests_running",
            "Requests holding sequence slots.",
            label,
            registry=reg,
        )
        self.waiting = Gauge(
            "multiserve:num_requests_waiting",
            "Requests queued for a sequence slot.",
            label,
            registry=reg,
        )
        per_replica = [*label, "replica", "node"]
        self.replica_in_flight = Gauge(
            "multiserve:replica_requests_in_flight",
            "Requests on each replica of a loaded model (one replica without --ray replicas).",
            per_replica,
            registry=reg,
        )
        self.replica_up = Gauge(
            "multiserve:replica_up",
            "1 for a replica serving, 0 for one that failed (its worker or node died).",
            per_replica,
            registry=reg,
        )
        self.route_decisions = Counter(
            "multiserve:router_decisions",
            'Requests for model "auto" admitted, by the rule that routed them and the model.',
            ["rule", *label],
            registry=reg,
        )
        self.route_seconds = Histogram(
            "multiserve:router_decision_seconds",
            'Time the router took to decide a request for model "auto".',
            buckets=_DECISION_BUCKETS,
            registry=reg,
        )
        self.stats: dict[str, ModelStats] = {model_id: ModelStats() for model_id in fleet.entries}
        self.routes: dict[str, dict[str, int]] = {}
        self.route_times: deque[float] = deque(maxlen=WINDOW)
        self.passed_over = 0

    def routed(self, rule: str, model_id: str, seconds: float, passed: int) -> None:
        """An `auto` request was admitted by `model_id` after `passed` targets refused it."""
        by_model = self.routes.setdefault(rule, {})
        by_model[model_id] = by_model.get(model_id, 0) + 1
        self.route_times.append(seconds)
        self.passed_over += passed
        self.route_decisions.labels(rule, model_id).inc()
        self.route_seconds.observe(seconds)

    def router_snapshot(self, conversations: int) -> dict:
        """JSON for `/stats`: decisions per rule and model, refusals passed over, time taken."""
        return {
            "decisions": self.routes,
            "passed_over": self.passed_over,
            "sticky_conversations": conversations,
            "decision_seconds": _summary(self.route_times),
        }

    def refused(self, model_id: str, kind: str) -> None:
        """A request refused before it was admitted (queue full, model unavailable)."""
        self.stats[model_id].refused += 1
        self.failed.labels(model_id, kind).inc()

    def track(self, model_id: str) -> RequestTracker:
        self.stats[model_id].requests += 1
        return RequestTracker(self, model_id)

    def _refresh_gauges(self) -> None:
        for model_id, entry in self.fleet.entries.items():
            client = entry.client
            self.running.labels(model_id).set(client.running if client else 0)
            self.waiting.labels(model_id).set(client.waiting if client else 0)
        self.replica_in_flight.clear()  # replicas come and go with loads: show only today's
        self.replica_up.clear()
        for model_id, entry in self.fleet.entries.items():
            for index, view in enumerate(entry.client.replicas() if entry.client else []):
                labels = (model_id, str(index), view.placement.node)
                self.replica_in_flight.labels(*labels).set(view.in_flight)
                self.replica_up.labels(*labels).set(1 if view.state == "loaded" else 0)

    def prometheus(self) -> bytes:
        self._refresh_gauges()
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """JSON for `/stats`: per model requests, tokens, queue and latency summaries."""
        models = {}
        for model_id, entry in self.fleet.entries.items():
            stats, client = self.stats[model_id], entry.client
            models[model_id] = {
                "state": entry.state.value,
                "giving_way": entry.yielding,
                "error": entry.error,
                "loads": entry.loads,
                "worker_pid": client.pid if client else None,
                "replicas": replicas(entry),
                "memory_bytes": {
                    "estimate": entry.estimate.as_dict() if entry.estimate else None,
                    "rss": client.rss_bytes() if client else None,
                },
                "requests": {
                    "in_system": entry.admission.in_system,
                    "capacity": entry.admission.capacity,
                    "total": stats.requests,
                    "succeeded": stats.succeeded,
                    "failed": stats.failed,
                    "refused": stats.refused,
                    "running": client.running if client else 0,
                    "waiting": client.waiting if client else 0,
                    "in_flight": client.in_flight if client else 0,
                    "inputs_embedded": stats.embedded_inputs,
                },
                "tokens": {"prompt": stats.prompt_tokens, "generated": stats.generation_tokens},
                "prefix_cache": None  # an embedding model keeps no prompt
                if entry.spec.embedding
                else {
                    "queried_tokens": stats.prompt_tokens,
                    "hit_tokens": stats.cached_tokens,
                    "hit_rate": round(stats.cached_tokens / stats.prompt_tokens, 4)
                    if stats.prompt_tokens
                    else None,
                    "host_bytes": client.host_cache.bytes if client else 0,
                    "host_entries": client.host_cache.entries if client else 0,
                    "host_limit_bytes": entry.estimate.host_cache if entry.estimate else None,
                },
                "latency_seconds": {
                    "time_to_first_token": _summary(stats.ttft),
                    "inter_token": _summary(stats.itl),
                    "end_to_end": _summary(stats.e2e),
                },
            }
        return {"models": models}


def replicas(entry: ModelEntry) -> list[dict]:
    """Where a model is loaded, or is loading (its places reserved, no worker answering yet)."""
    if entry.client is not None:
        views = entry.client.replicas()
    elif entry.reservation is not None and entry.holds_memory:
        views = [ReplicaView(p, "loading", 0, None, 0) for p in entry.reservation.placements]
    else:
        views = []
    return [_replica(view) for view in views]


def _replica(view: ReplicaView) -> dict:
    return {
        "node": view.placement.node,
        "node_id": view.placement.node_id,
        "state": view.state,
        "in_flight": view.in_flight,
        "requests": view.requests,
        "worker_pid": view.pid,
    }


class RequestTracker:
    """Times one request from arrival; every method is cheap (called once per token delivery)."""

    def __init__(self, metrics: Metrics, model_id: str) -> None:
        self._metrics = metrics
        self._model = model_id
        self._stats = metrics.stats[model_id]
        self.started = time.perf_counter()
        self._last: float | None = None

    def delivered(self) -> None:
        """Tokens reached the client's response now."""
        now = time.perf_counter()
        if self._last is None:
            self._stats.ttft.append(now - self.started)
            self._metrics.ttft.labels(self._model).observe(now - self.started)
        else:
            self._stats.itl.append(now - self._last)
            self._metrics.itl.labels(self._model).observe(now - self._last)
        self._last = now

    def finished(self, usage: Usage, reasons: list[str]) -> None:
        elapsed = time.perf_counter() - self.started
        metrics, stats = self._metrics, self._stats
        stats.succeeded += 1
        stats.prompt_tokens += usage.prompt_tokens
        stats.cached_tokens += usage.cached_tokens
        stats.generation_tokens += usage.completion_tokens
        stats.e2e.append(elapsed)
        metrics.e2e.labels(self._model).observe(elapsed)
        metrics.prompt_tokens.labels(self._model).inc(usage.prompt_tokens)
        metrics.generation_tokens.labels(self._model).inc(usage.completion_tokens)
        metrics.cache_queries.labels(self._model).inc(usage.prompt_tokens)
        metrics.cache_hits.labels(self._model).inc(usage.cached_tokens)
        for reason in reasons:
            metrics.finished.labels(self._model, reason).inc()

    def embedded(self, inputs: int, tokens: int) -> None:
        """An embeddings request answered: `inputs` vectors from `tokens` prompt tokens."""
        elapsed = time.perf_counter() - self.started
        metrics, stats = self._metrics, self._stats
        stats.succeeded += 1
        stats.prompt_tokens += tokens
        stats.embedded_inputs += inputs
        stats.e2e.append(elapsed)
        metrics.e2e.labels(self._model).observe(elapsed)
        metrics.prompt_tokens.labels(self._model).inc(tokens)
        metrics.embedded_inputs.labels(self._model).inc(inputs)

    def failed(self, kind: str) -> None:
        self._stats.failed += 1
        self._metrics.failed.labels(self._model, kind).inc()
