"""The seed's day, replayed: the five experts at their real sizes behind one endpoint.

    .venv/bin/python -m benchmarks.experts_day [--only alone,day] [--experts NAME,...]
                                               [--minutes 12] [--budget 22.5GiB] [--threads CORES]
                                               [--port 8097] [--out-dir DIR] [--no-fail]

Runs examples/experts.toml, as shipped but for the model paths (the shape-true files of
benchmarks/shapes, 26 GB, written first if missing), this machine's threads and a memory budget
that holds about three of the experts (22.5 GiB on a 24 GiB machine: Qwen, Mistral and Aya
together, or Qwen and phi-4). Two parts, about 35 minutes on a 2-core machine:

1. `alone`: each expert by itself (benchmarks/experts_day/one_by_one.py): cold loads from disk and
   from the page cache against raw llama.cpp's, decode speed at 1 and 4 streams against raw
   llama.cpp's and against the ceiling the machine's memory bandwidth sets, and a chat's next
   turn (~500 tokens) with and without prefix reuse;
2. `day`: the shipped config (Qwen preloaded and pinned) under a day of traffic
   (benchmarks/experts_day/day.py): loads, evictions, cold and warm TTFT per expert, and whether
   any request was refused that could have waited.

Targets (exit status 1 on a miss): cold start from the page cache <= 1.5x raw llama.cpp's;
1-stream decode >= 0.85x raw llama.cpp's; a chat's next turn with reuse <= 0.5x its TTFT read
again; over the day, every request complete and none refused. Nothing else may run meanwhile:
two cores oversubscribed make every figure meaningless.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import psutil

from benchmarks.common.machine import machine_info
from benchmarks.common.multiserve_config import serving_config
from benchmarks.common.output import console, out
from benchmarks.common.servers import RunningServer, port_taken, run_benchmark
from benchmarks.common.sse import loopback_client
from benchmarks.common.verdict import add_no_fail, exit_status
from benchmarks.experts_day.day import Day, DayLog
from benchmarks.experts_day.one_by_one import ExpertRun, measure_expert
from benchmarks.experts_day.report import day_table, latency_table, speed_table
from benchmarks.experts_day.seed import seed_text, written

PARTS = ("alone", "day")
LOAD_TIMEOUT_S = 900.0  # the server's start, with a 4.7 GB model read from a slow disk
REQUEST_TIMEOUT_S = 1800.0  # a request may wait for a 9 GB load and a busy model's turn
DRAIN_S = 120.0  # conversations under way finish after the day's end


def alone(args: argparse.Namespace, directory: Path) -> list[ExpertRun]:
    text = seed_text(args.threads, args.budget, pinned=False)
    settings = written(text, directory / "alone.toml")
    ids = [m.id for m in settings.models]
    chosen = args.experts.split(",") if args.experts else ids
    if unknown := set(chosen) - set(ids):
        raise SystemExit(f"--experts: no model `{', '.join(sorted(unknown))}` (ids: {ids})")
    specs = [m for m in settings.models if m.id in chosen]

    async def each(server: RunningServer) -> list[ExpertRun]:
        async with loopback_client(args.port, timeout_s=REQUEST_TIMEOUT_S) as client:
            return [await measure_expert(server, client, spec, args.threads) for spec in specs]

    with serving_config("alone", text, directory, args.port, timeout_s=LOAD_TIMEOUT_S) as server:
        return asyncio.run(each(server))


def day(args: argparse.Namespace, directory: Path) -> DayLog:
    text = seed_text(args.threads, args.budget, pinned=True)
    settings = written(text, directory / "day.toml")
    preloaded = [m.id for m in settings.models if m.preload]
    ttl = min((m.idle_ttl for m in settings.models if m.idle_ttl and not m.pinned), default=None)
    if ttl is not None and args.minutes * 60 >= ttl - DRAIN_S:
        # an idle unload would be counted as an eviction
        raise SystemExit(f"--minutes: the day must end well before the idle_ttl of {ttl:.0f} s")

    async def replay() -> DayLog:
        async with loopback_client(args.port, timeout_s=REQUEST_TIMEOUT_S) as client:
            return await Day(client, args.minutes * 60, args.seed).run()

    with serving_config(
        "day", text, directory, args.port, loaded=preloaded, timeout_s=LOAD_TIMEOUT_S
    ):
        return asyncio.run(replay())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"of {', '.join(PARTS)}")
    parser.add_argument("--experts", help="the experts measured alone (default: all five)")
    parser.add_argument("--minutes", type=float, default=12.0, help="length of the day")
    parser.add_argument("--budget", default="22.5GiB", help="the server's memory_budget")
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument("--seed", type=int, default=0, help="of the day's bursts")
    parser.add_argument("--out-dir", type=Path, help="keep configs, logs and results.json here")
    add_no_fail(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    parts = args.only.split(",")
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"--only: unknown part {', '.join(sorted(unknown))}")
    if port_taken(args.port):
        return 2
    directory = args.out_dir or Path(tempfile.mkdtemp(prefix="experts-day-"))
    directory.mkdir(parents=True, exist_ok=True)
    console.print(f"configs, logs and results in {directory}")
    out.print(f"machine: {machine_info()}")
    results: dict[str, object] = {"machine": machine_info()}
    missed: list[str] = []
    saved = directory / "results.json"
    if "alone" in parts:
        runs = alone(args, directory)
        results["alone"] = [asdict(run) for run in runs]
        saved.write_text(json.dumps(results, indent=1))  # kept if the day fails
        missed += speed_table(runs) + latency_table(runs)
    if "day" in parts:
        log = day(args, directory)
        results["day"] = {
            **{k: v for k, v in asdict(log).items() if k != "requests"},
            "requests": [
                {"model": r.model, "user": r.user, "at_s": r.at_s, "cold": r.cold}
                | {"status": r.reply.status, "code": r.reply.code, "ttft": r.reply.ttft}
                for r in log.requests
            ],
        }
        saved.write_text(json.dumps(results, indent=1))
        missed += day_table(log)
    return exit_status(missed, args.no_fail)


if __name__ == "__main__":
    run_benchmark(main)
