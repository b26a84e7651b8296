"""The Ray backend: its overhead against the local one, and routing between two replicas.

    .venv/bin/python -m benchmarks.ray_cluster [--threads 2] [--rounds 3] [--conversations 8]
                                               [--turns 4] [--port 8099]
                                               [--out-dir benchmarks/results] [--no-fail]

Part 1, overhead on one node. The default model (Gemma 3 270M, 8 slots) is served with the same
config twice: by the local backend, and with `ray_address` on a one-node Ray cluster of
simulated nodes on this machine (one node with `--threads` CPUs), one after the other, the side
that goes first alternating between rounds. On each: time to first token of a one-token answer
to a short prompt (median of 8, no prefix shared), decode tokens/s of one stream (median of 3
answers of 128 tokens) and of 8 streams decoding at once. Targets: `--ray` >= 0.9x the local
tokens/s at 1 and at 8 streams, and <= 1.2x its time to first token (medians over rounds).

Part 2, routing between two replicas. Two simulated nodes with one CPU each, the model with
`replicas = 2` and one thread; `--conversations` chats of `--turns` turns under one shared system
prompt, four conversations at a time. Each replica's share of the requests (from /stats) must be
within 10% of an even share, and at least 90% of the later turns must read their conversation so
far from the cache (cached tokens at least 90% of the previous turn's prompt: the turn went back
to its replica). The same chats on one replica give the cache's own hit rate for comparison.
Throughput cannot grow on one 2-core machine; docs/cluster.md has the capacity model.

Timings on a shared machine drift: only ratios within one invocation mean anything. The exit
status is 1 on a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.common.machine import machine_info
from benchmarks.common.multiserve_config import config_text, model_table, serving_config
from benchmarks.common.output import console, out
from benchmarks.common.prompts import prompt_text
from benchmarks.common.servers import RunningServer, port_taken, run_benchmark
from benchmarks.common.sse import (
    EXACT_GREEDY,
    Streamed,
    complete,
    decode_rate,
    loopback_client,
    require_complete,
    stream,
)
from benchmarks.common.verdict import add_no_fail, exit_status, runs_text, target_table, verdict
from multiserve.backends.ray_local import local_cluster

GiB = 1 << 30
MODEL = "gemma"
DECODE_TOKENS = 128
STREAMS = 8
TTFT_SAMPLES = 8
ANSWER_TOKENS = 24
AT_ONCE = 4  # conversations in flight in part 2
MIN_TOKENS_RATIO, MAX_TTFT_RATIO = 0.9, 1.2
SPREAD, RETURNED = 0.10, 0.90
SYSTEM = (
    "You are the support assistant of a small bookshop. Answer in two short sentences, in plain "
    "words, and never invent a title, a price or an opening time you were not told about. "
)
TOPICS = ("delivery times", "gift cards", "second-hand books", "reading clubs", "returns")


@dataclass
class Overhead:
    ttft_s: float
    one_stream: float  # tokens/s
    streams: float  # tokens/s of STREAMS at once


@dataclass
class Routing:
    replica_requests: list[int]
    later_turns: int
    returned: int  # later turns that read their conversation so far from the cache

    @property
    def spread(self) -> float:
        """The largest distance of a replica's share from an even one, relative to it."""
        even = sum(self.replica_requests) / len(self.replica_requests)
        return max(abs(n - even) / even for n in self.replica_requests)

    @property
    def returned_share(self) -> float:
        return self.returned / self.later_turns


def _rate(reply: Streamed) -> float:
    return (len(reply.t_chunks) - 1) / (reply.t_last - reply.t_first)


async def measure_overhead(port: int) -> Overhead:
    async with loopback_client(port) as client:
        require_complete([await complete(client, MODEL, prompt_text(999), 16)], 16)  # warm-up
        ttft = []
        for i in range(TTFT_SAMPLES):
            reply = await complete(client, MODEL, prompt_text(i), 1)
            require_complete([reply], 1)
            ttft.append(reply.t_first - reply.t_send)
        singles = [
            await complete(client, MODEL, prompt_text(50 + i), DECODE_TOKENS) for i in range(3)
        ]
        require_complete(singles, DECODE_TOKENS)
        jobs = [
            complete(client, MODEL, prompt_text(100 + i), DECODE_TOKENS) for i in range(STREAMS)
        ]
        batch = await asyncio.gather(*jobs)
        require_complete(batch, DECODE_TOKENS)
    return Overhead(
        statistics.median(ttft), statistics.median(_rate(r) for r in singles), decode_rate(batch)
    )


async def _conversation(client: httpx.AsyncClient, index: int, turns: int) -> list[float | None]:
    """One chat; for each later turn, its cached tokens over the previous turn's prompt."""
    topic = TOPICS[index % len(TOPICS)]
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Customer {index} here, with a question about {topic}."},
    ]
    shares: list[float | None] = []
    previous = None
    for turn in range(turns):
        body = {"model": MODEL, "messages": messages, "max_tokens": ANSWER_TOKENS, **EXACT_GREEDY}
        reply = (await stream(client, "/v1/chat/completions", body)).raise_for_failure()
        if previous is not None:
            shares.append((reply.cached_tokens or 0) / previous)
        previous = reply.prompt_tokens
        messages += [
            {"role": "assistant", "content": reply.text},
            {"role": "user", "content": f"Thanks. And about {topic}, point {turn + 2}?"},
        ]
    return shares


async def measure_routing(server: RunningServer, conversations: int, turns: int) -> Routing:
    gate = asyncio.Semaphore(AT_ONCE)
    async with loopback_client(server.port) as client:

        async def one(index: int) -> list[float | None]:
            async with gate:
                return await _conversation(client, index, turns)

        shares = [s for chat in await asyncio.gather(*map(one, range(conversations))) for s in chat]
        replicas = (await client.get("/stats")).json()["models"][MODEL]["replicas"]
    return Routing(
        [r["requests"] for r in replicas],
        len(shares),
        sum(share is not None and share >= RETURNED for share in shares),
    )


@contextlib.contextmanager
def served(
    name: str, args: argparse.Namespace, table: dict, memories: Sequence[int] = (), cpus: int = 0
) -> Iterator[RunningServer]:
    """The model in `table`, locally or (with `memories`) on a fresh simulated Ray cluster."""
    with contextlib.ExitStack() as stack:
        fields = {}
        if memories:
            cluster, _ = stack.enter_context(local_cluster(list(memories), cpus))
            fields = {"ray_address": cluster.address}
        config = config_text(args.threads, [table], server_fields=fields)
        yield stack.enter_context(
            serving_config(name, config, args.out_dir, args.port, loaded=[MODEL], timeout_s=300)
        )


def overhead_runs(args: argparse.Namespace) -> dict[str, list[Overhead]]:
    table = model_table(MODEL, n_parallel=STREAMS, n_ctx=1024, threads=args.threads, preload=True)
    runs: dict[str, list[Overhead]] = {"local": [], "ray": []}
    for round_ in range(args.rounds):
        for side in ("local", "ray") if round_ % 2 == 0 else ("ray", "local"):
            console.print(f"overhead, round {round_ + 1}: {side}")
            memories = [8 * GiB] if side == "ray" else []
            with served(f"ray-overhead-{side}", args, table, memories, args.threads) as server:
                runs[side].append(asyncio.run(measure_overhead(server.port)))
    return runs


def routing_runs(args: argparse.Namespace) -> dict[str, Routing]:
    results = {}
    for replicas in (2, 1):
        console.print(f"routing: {replicas} replica(s)")
        table = model_table(
            MODEL, n_parallel=4, n_ctx=2048, threads=1, replicas=replicas, preload=True
        )
        with served(f"ray-routing-{replicas}", args, table, [4 * GiB] * replicas, 1) as server:
            results[f"{replicas} replicas"] = asyncio.run(
                measure_routing(server, args.conversations, args.turns)
            )
    return results


def report(runs: dict[str, list[Overhead]], routing: dict[str, Routing]) -> list[str]:
    """Print both parts' tables; the targets missed."""
    local, ray = runs["local"], runs["ray"]
    ratios = {
        "tokens/s, 1 stream (ray / local)": [
            r.one_stream / base.one_stream for r, base in zip(ray, local, strict=True)
        ],
        f"tokens/s, {STREAMS} streams (ray / local)": [
            r.streams / base.streams for r, base in zip(ray, local, strict=True)
        ],
        "time to first token (ray / local)": [
            r.ttft_s / base.ttft_s for r, base in zip(ray, local, strict=True)
        ],
    }
    missed = []
    table = target_table("Part 1: the Ray backend on one node against the local backend")
    for name, values in ratios.items():
        median = statistics.median(values)
        ttft = "first token" in name
        ok = median <= MAX_TTFT_RATIO if ttft else median >= MIN_TOKENS_RATIO
        target = f"<= {MAX_TTFT_RATIO}" if ttft else f">= {MIN_TOKENS_RATIO}"
        table.add_row(name, f"{median:.3f}", runs_text(values, fmt="{:.3f}"), target, verdict(ok))
        if not ok:
            missed.append(name)
    out.print(table)
    for side, values in runs.items():
        out.print(
            f"{side}: TTFT {runs_text([v.ttft_s for v in values], 1000, '{:.0f}')} ms; 1 stream "
            f"{runs_text([v.one_stream for v in values])} tok/s; {STREAMS} streams "
            f"{runs_text([v.streams for v in values])} tok/s"
        )
    two, one = routing["2 replicas"], routing["1 replicas"]
    table = target_table("Part 2: two replicas on two simulated nodes")
    spread_ok, returned_ok = two.spread <= SPREAD, two.returned_share >= RETURNED
    table.add_row(
        "largest distance from an even share",
        f"{two.spread:.1%}",
        " / ".join(map(str, two.replica_requests)) + " requests",
        f"<= {SPREAD:.0%}",
        verdict(spread_ok),
    )
    table.add_row(
        "later turns read from their replica's cache",
        f"{two.returned_share:.1%}",
        f"{two.returned}/{two.later_turns}; one replica: {one.returned}/{one.later_turns}",
        f">= {RETURNED:.0%}",
        verdict(returned_ok),
    )
    out.print(table)
    missed += [] if spread_ok else ["replica spread"]
    missed += [] if returned_ok else ["turns back to their replica"]
    return missed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ray_cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each backend in part 1")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    add_no_fail(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if port_taken(args.port):
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = overhead_runs(args)
    routing = routing_runs(args)
    machine = machine_info()
    out.print(f"command: {shlex.join(sys.orig_argv)}")
    out.print(
        f"machine: {machine['machine']}, {machine['cpu']}, {machine['logical_cores']} logical / "
        f"{machine['physical_cores']} physical cores; llama-cpp-python "
        f"{machine['llama_cpp_python']}"
    )
    missed = report(runs, routing)
    results = {
        "machine": machine,
        "overhead": {side: [asdict(r) for r in values] for side, values in runs.items()},
        "routing": {name: asdict(r) for name, r in routing.items()},
        "missed": missed,
    }
    (args.out_dir / "ray_cluster.json").write_text(json.dumps(results, indent=2) + "\n")
    return exit_status(missed, args.no_fail)


if __name__ == "__main__":
    run_benchmark(main)
