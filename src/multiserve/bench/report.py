"""What a run leaves behind: a live progress bar, a summary table, a JSON file and PNG plots.

The JSON uses vLLM `bench serve` field names (completed, failed, duration, ..., p99_ttft_ms) so
existing tooling can read it; everything else the run knows (config, per-request records,
errors, why it stopped, cold start, precheck) is there too, because a number without its
conditions cannot be compared later. The API key is never written, only whether one was set.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from multiserve import __version__
from multiserve.bench.client import RequestError, RequestRecord
from multiserve.bench.metrics import LATENCIES, tpot
from multiserve.bench.runner import BenchResult, PointResult

if TYPE_CHECKING:  # matplotlib and numpy load only when plotting
    import numpy as np
    from matplotlib.figure import Figure

SCHEMA_VERSION = 1


class LiveProgress:
    """A rich progress bar per phase (warmup, each load point) with running error counts."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task = None
        self._ok = self._failed = 0

    def start(self, label: str, total: int) -> None:
        self._ok = self._failed = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/]"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total, ok=0, failed=0)

    def advance(self, record: RequestRecord) -> None:
        if self._progress is None or self._task is None:
            return
        if record.success:
            self._ok += 1
        elif record.error is not None and record.error.kind != "cancelled":
            self._failed += 1
        self._progress.update(self._task, advance=1, ok=self._ok, failed=self._failed)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = self._task = None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _rate_json(rate: float | None) -> float | str | None:
    return "inf" if rate is not None and math.isinf(rate) else rate


def error_json(error: RequestError | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {"kind": error.kind, "status": error.status, "message": error.message}


def record_json(record: RequestRecord, origin: float) -> dict[str, Any]:
    """One request; times in ms, `start_ms` from its load point's start."""
    return {
        "index": record.index,
        "success": record.success,
        "start_ms": _ms(record.sent - origin),
        "ttft_ms": _ms(record.ttft),
        "tpot_ms": _ms(tpot(record)) if record.success else None,
        "e2el_ms": _ms(record.e2el),
        "itl_ms": [_ms(gap) for gap in record.itl],
        "output_tokens": record.output_tokens,
        "output_token_source": record.output_token_source,
        "input_tokens": record.input_tokens,
        "input_token_source": record.input_token_source,
        "finish_reason": record.finish_reason,
        "refusals": record.refusals,
        "retry_wait_ms": _ms(record.retry_wait),
        "error": error_json(record.error),
    }


def point_json(point: PointResult) -> dict[str, Any]:
    return {
        "concurrency": point.point.concurrency,
        "rate": _rate_json(point.point.rate),
        "burstiness": point.point.burstiness,
        "started_at": point.started_at.isoformat(),
        "ended_by": point.ended_by,
        "stopped_early": point.stopped_early,
        "delayed_arrivals": point.delayed_arrivals,
        "peak_inflight": point.peak_inflight,
        **point.summary,
        "records": [record_json(r, point.started) for r in point.records],
    }


def config_json(result: BenchResult) -> dict[str, Any]:
    cfg, client, workload = result.config, result.config.client, result.config.workload
    return {
        "url": client.url,
        "model": client.model,
        "endpoint": client.endpoint,
        "api_key_set": bool(client.api_key),
        "input_tokens": workload.input_tokens if workload.file_prompts is None else None,
        "output_tokens": workload.output_tokens,
        "prompts_file_lines": len(workload.file_prompts) if workload.file_prompts else None,
        "points": [
            {"concurrency": p.concurrency, "rate": _rate_json(p.rate), "burstiness": p.burstiness}
            for p in cfg.points
        ],
        "sweep": cfg.sweep,
        "requests": cfg.requests,
        "duration": cfg.duration,
        "warmup": cfg.warmup,
        "seed": cfg.seed,
        "request_seed": client.seed,  # the `seed` field sent, if any
        "ignore_eos": client.ignore_eos,
        "temperature": client.temperature,
        "slo": cfg.slo.as_dict() if cfg.slo else None,
        "max_inflight": cfg.max_inflight,
        "max_error_rate": cfg.max_error_rate,
        "error_window": cfg.error_window,
        "max_retries": client.max_retries,
        "timeout": client.timeout,
        "precheck": cfg.precheck,
    }


def result_json(result: BenchResult, extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole results file. A single-point run also has its summary at the top level."""
    cfg = result.config
    cold = result.cold_start
    warm = result.warmup_records
    origin = warm[0].sent if warm else 0.0
    data: dict[str, Any] = {
        "tool": "multiserve bench",
        "version": __version__,
        "schema_version": SCHEMA_VERSION,
        "started_at": result.started_at.isoformat(),
        "finished_at": result.finished_at.isoformat() if result.finished_at else None,
        "server": {"url": cfg.client.url, "model": cfg.client.model},
        "config": {**config_json(result), **(extra_config or {})},
        "precheck": (
            None
            if result.precheck is None
            else {
                "ok": result.precheck.ok,
                "message": result.precheck.message,
                "health_status": result.precheck.health_status,
                "waiting": result.precheck.waiting,
            }
        ),
        "cold_start": (
            None
            if cold is None
            else {
                "success": cold.success,
                "ttft_ms": _ms(cold.ttft),
                "e2el_ms": _ms(cold.e2el),
                "error": error_json(cold.error),
            }
        ),
        "warmup": {
            "requests": len(warm),
            "completed": sum(r.success for r in warm),
            "records": [record_json(r, origin) for r in warm],
        },
        "stopped_early": result.stopped_early,
        "sweep": (
            None
            if cfg.sweep is None
            else {
                "parameter": cfg.sweep,
                "values": [
                    p.concurrency if cfg.sweep == "concurrency" else _rate_json(p.rate)
                    for p in cfg.points
                ],
            }
        ),
        "points": [point_json(p) for p in result.points],
    }
    if len(cfg.points) == 1 and len(result.points) == 1:
        point = data["points"][0]
        only = cfg.points[0]
        skip = ("records", "started_at", "concurrency", "rate", "stopped_early")
        data.update({k: v for k, v in point.items() if k not in skip})
        data.update(
            model_id=cfg.client.model,
            num_prompts=cfg.requests,
            request_rate=_rate_json(only.rate) if only.rate is not None else "inf",
            max_concurrency=only.concurrency,
        )
    return data


def write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def summary_table(result: BenchResult) -> Table:
    """vLLM's result block, one column per load point."""
    table = Table(
        title=f"multiserve bench: {result.config.client.model} @ {result.config.client.url}"
    )
    table.add_column("metric")
    for point in result.points:
        table.add_column(point.point.label, justify="right")
    rows: list[tuple[str, str, int]] = [
        ("Successful requests", "completed", 0),
        ("Failed requests", "failed", 0),
        ("Cancelled at stop", "cancelled", 0),
        ("Benchmark duration (s)", "duration", 2),
        ("Total input tokens", "total_input_tokens", 0),
        ("Total generated tokens", "total_output_tokens", 0),
        ("Request throughput (req/s)", "request_throughput", 2),
        ("Request goodput (req/s)", "request_goodput", 2),
        ("Output token throughput (tok/s)", "output_throughput", 2),
        ("Total token throughput (tok/s)", "total_token_throughput", 2),
    ]
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
    for metric in LATENCIES:
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {names[metric]} (ms)", f"{stat}_{metric}_ms", 2))
    for label, key, digits in rows:
        if key == "request_goodput" and result.config.slo is None:
            continue
        table.add_row(label, *(_fmt(p.summary.get(key), digits) for p in result.points))
    table.add_row(
        "Output token count from", *(_fmt(p.summary["output_token_source"]) for p in result.points)
    )
    table.add_row("Refusals (429/503)", *(_fmt(p.summary["refusals"]) for p in result.points))
    table.add_row(
        "Errors",
        *(
            ", ".join(f"{k} {v}" for k, v in p.summary["errors"].items()) or "-"
            for p in result.points
        ),
    )
    table.add_row("Ended by", *(p.ended_by for p in result.points))
    return table


def print_summary(result: BenchResult, console: Console) -> None:
    if result.precheck is not None:
        style = "green" if result.precheck.ok else "red"
        console.print(f"precheck: [{style}]{result.precheck.message}[/]")
    cold = result.cold_start
    if cold is not None:
        if cold.success:
            console.print(
                f"cold start: TTFT {_fmt(_ms(cold.ttft))} ms, E2EL {_fmt(_ms(cold.e2el))} ms"
            )
        elif cold.error is not None:
            console.print(f"cold start: [red]failed ({cold.error.kind}: {cold.error.message})[/]")
    if result.points:
        console.print(summary_table(result))
    for point in result.points:
        failures = Counter(
            f"{r.error.kind} {r.error.status or ''}: {r.error.message}".replace(" :", ":")
            for r in point.records
            if r.error is not None and r.error.kind != "cancelled"
        )
        for message, count in failures.most_common(3):
            console.print(f"[red]{point.point.label}: {count} x {message}[/]", highlight=False)
    if result.stopped_early:
        console.print(f"[bold red]stopped early:[/] {result.stopped_early}")


def brief_summary(result: BenchResult) -> list[str]:
    """One line per load point for --quiet: enough to see that the run worked and how fast,
    without the table."""
    lines = []
    for point in result.points:
        s = point.summary
        lines.append(
            f"{point.point.label}: {s['completed']} ok, {s['failed']} failed, "
            f"{_fmt(s['output_throughput'], 1)} output tok/s, "
            f"median TTFT {_fmt(s['median_ttft_ms'], 1)} ms"
        )
    return lines


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_HISTOGRAM_BINS = 30
_HISTOGRAMS: tuple[tuple[str, Callable[[RequestRecord], float | None]], ...] = (
    ("TTFT", lambda r: r.ttft),
    ("TPOT", tpot),
    ("E2EL", lambda r: r.e2el),
)


def shared_bin_edges(
    series: Sequence[Sequence[float]], bins: int = _HISTOGRAM_BINS
) -> np.ndarray | None:
    """One set of bin edges over every series' values, so the load points' histograms line up
    bar for bar and can be compared; None when there are no values at all."""
    import numpy as np

    values = [v for s in series for v in s]
    return np.histogram_bin_edges(values, bins=bins) if values else None


def latency_figure(result: BenchResult) -> Figure:
    """TTFT/TPOT/E2EL histograms, one step outline per load point on shared bins, with
    whole-number ticks on the request-count axis (there is no half a request)."""
    plt = _mpl()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (name, getter) in zip(axes, _HISTOGRAMS, strict=True):
        series: list[list[float]] = []
        for point in result.points:
            values = [getter(r) for r in point.records if r.success]
            series.append([v * 1000 for v in values if v is not None])
        edges = shared_bin_edges(series)
        for point, values in zip(result.points, series, strict=True):
            if values:
                ax.hist(values, bins=edges, histtype="step", linewidth=1.5, label=point.point.label)
        ax.set_title(f"{name} distribution")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("requests")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if len(result.points) > 1 and ax.has_data():
            ax.legend(fontsize="small")
    fig.suptitle(f"{result.config.client.model} @ {result.config.client.url}")
    fig.tight_layout()
    return fig


def plot_run(result: BenchResult, directory: Path) -> list[Path]:
    """latency.png (see latency_figure) and, for sweeps, sweep.png (throughput and latency
    against the swept parameter)."""
    plt = _mpl()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    fig = latency_figure(result)
    path = directory / "latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    sweep = result.config.sweep
    if sweep and result.points:
        xs = [
            p.point.concurrency if sweep == "concurrency" else p.point.rate for p in result.points
        ]
        xlabel = "concurrency" if sweep == "concurrency" else "request rate (req/s)"
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        ax = axes[0][0]
        ax.plot(
            xs, [p.summary["output_throughput"] for p in result.points], "o-", label="output tok/s"
        )
        ax.plot(
            xs,
            [p.summary["total_token_throughput"] for p in result.points],
            "s--",
            label="total tok/s",
        )
        ax.set_title("throughput")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize="small")
        for ax, metric in ((axes[0][1], "ttft"), (axes[1][0], "tpot"), (axes[1][1], "e2el")):
            for stat, style in (("median", "o-"), ("p99", "s--")):
                ys = [p.summary[f"{stat}_{metric}_ms"] for p in result.points]
                ys = [math.nan if y is None else y for y in ys]
                ax.plot(xs, ys, style, label=stat)
            ax.set_title(f"{metric.upper()} (ms)")
            ax.legend(fontsize="small")
        for row in axes:
            for ax in row:
                if all(x is not None and math.isfinite(x) for x in xs):
                    ax.set_xticks(xs)
                ax.set_xlabel(xlabel)
                ax.grid(alpha=0.3)
        fig.tight_layout()
        path = directory / "sweep.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
