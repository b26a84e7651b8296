"""`multiserve bench`: command-line options into a RunConfig, run it, report it.

Exit status: 0 when the run ended by its bounds (requests done or --duration reached), 1 when it
stopped early (error rate, failed warmup, precheck refusal, Ctrl-C; results are still written)
or a load point completed no request at all, 2 for unusable options.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys

from rich.console import Console

from multiserve.bench.client import ClientOptions
from multiserve.bench.metrics import parse_slo
from multiserve.bench.report import (
    LiveProgress,
    brief_summary,
    plot_run,
    print_summary,
    result_json,
    write_json,
)
from multiserve.bench.runner import BenchResult, BenchRunner, BenchSetupError, LoadPoint, RunConfig
from multiserve.bench.workload import WorkloadError, make_workload


def _numbers(text: str, kind: type, flag: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise BenchSetupError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise BenchSetupError(f"{flag}: no values")
    return values


def build_config(args: argparse.Namespace) -> RunConfig:
    """Validate the options and make the run's configuration."""
    if args.sweep_concurrency and args.sweep_rate:
        raise BenchSetupError("choose one of --sweep-concurrency and --sweep-rate")
    sweep = None
    burstiness = args.burstiness
    if args.sweep_concurrency:
        sweep = "concurrency"
        values = _numbers(args.sweep_concurrency, int, "--sweep-concurrency")
        points = tuple(LoadPoint(c, args.rate, burstiness) for c in values)
    elif args.sweep_rate:
        sweep = "rate"
        values = _numbers(args.sweep_rate, float, "--sweep-rate")
        points = tuple(LoadPoint(args.concurrency, r, burstiness) for r in values)
    elif args.rate is not None:
        points = (LoadPoint(args.concurrency, args.rate, burstiness),)
    else:
        points = (LoadPoint(args.concurrency or 1, None, burstiness),)
    if args.rate is None and not args.sweep_rate and burstiness != 1.0:
        raise BenchSetupError(
            "--burstiness shapes open-loop arrivals: it needs --rate or --sweep-rate"
        )
    if args.timeout <= 0 or math.isinf(args.timeout):
        raise BenchSetupError("--timeout must be a positive number of seconds")
    if args.max_retries < 0:
        raise BenchSetupError("--max-retries cannot be negative")
    seed = 0 if args.seed is None else args.seed
    try:
        slo = parse_slo(args.slo) if args.slo else None
        workload = make_workload(
            args.endpoint, args.input_tokens, args.output_tokens, seed, args.prompts_file
        )
    except (ValueError, WorkloadError) as exc:
        raise BenchSetupError(str(exc)) from None
    if not args.url.startswith(("http://", "https://")):
        raise BenchSetupError("--url must start with http:// or https://")
    client = ClientOptions(
        url=args.url,
        model=args.model,
        endpoint=args.endpoint,
        api_key=args.api_key,
        temperature=args.temperature,
        seed=args.seed,  # sent only when given
        ignore_eos=args.ignore_eos,
        timeout=args.timeout,
        max_retries=args.max_retries,
        max_connections=args.max_inflight,
    )
    config = RunConfig(
        client=client,
        workload=workload,
        points=points,
        sweep=sweep,
        requests=args.requests,
        duration=args.duration,
        warmup=args.warmup,
        seed=seed,
        max_inflight=args.max_inflight,
        max_error_rate=args.max_error_rate,
        precheck=args.precheck,
        slo=slo,
    )
    config.validate()
    return config


async def _run(runner: BenchRunner) -> BenchResult:
    loop = asyncio.get_running_loop()
    signals = [signal.SIGINT, signal.SIGTERM]
    for sig in signals:
        try:
            loop.add_signal_handler(sig, runner.request_stop, f"interrupted ({sig.name})")
        except (NotImplementedError, RuntimeError):  # not the main thread / not POSIX
            signals.remove(sig)
    try:
        return await runner.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run_bench(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    out = Console()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per request
    try:
        config = build_config(args)
    except BenchSetupError as exc:
        print(f"multiserve bench: {exc}", file=sys.stderr)
        return 2
    progress = None if args.quiet else LiveProgress(err)
    runner = BenchRunner(config, progress=progress, log=lambda msg: err.print(f"[yellow]{msg}[/]"))
    result = asyncio.run(_run(runner))

    def note(message: str) -> None:
        """Plain stderr lines under --quiet, so stdout stays empty for scripts."""
        if args.quiet:
            print(f"multiserve bench: {message}", file=sys.stderr)
        else:
            err.print(message, markup=False, soft_wrap=True)  # a path is not markup

    if args.quiet:  # still say how it went, or a quiet run looks like it did nothing
        for line in brief_summary(result):
            note(line)
        if result.stopped_early:
            note(f"stopped early: {result.stopped_early}")
    else:
        print_summary(result, out)
    if args.out is not None:
        write_json(result_json(result), args.out)
        note(f"results written to {args.out}")
    if args.plot is not None:
        if result.points:
            for path in plot_run(result, args.plot):
                note(f"plot written to {path}")
        else:
            note("no plots written: no load point ran")
    if result.stopped_early or any(p.summary["completed"] == 0 for p in result.points):
        return 1
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from multiserve.bench import compare

    return compare.main(args.files, args.plot, Console(), Console(stderr=True))
