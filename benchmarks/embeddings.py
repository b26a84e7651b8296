"""Embeddings throughput: multiserve against llama.cpp's `llama-server --embeddings`.

    .venv/bin/python -m benchmarks.embeddings [--threads 2] [--clients 4] [--requests 8]
                                              [--rounds 1] [--llama-slots 32] [--port 8098]
                                              [--out-dir benchmarks/results] [--no-fail]

Both servers embed with the default model (Gemma 3 270M), the same threads and mean pooling,
one after the other (never both at once; the side that goes first alternates between rounds).
multiserve runs as it ships with no config: its default model answers /v1/embeddings from its
embeddings companion. llama-server is built from the llama.cpp sources llama-cpp-python vendors,
with our CMake flags (scripts/build-llama-server.sh; cached), and gets `--llama-slots` slots so
that a whole request's inputs are decoded together.

Every request embeds 32 inputs of exactly 64 tokens, sent as token arrays, so both servers read
the same tokens, and no two inputs are alike (nothing can come from a cache). `--clients`
clients each keep one request in flight until `--requests` requests are done, after one untimed
warm-up request. Throughput is inputs embedded per second of that wall time; the ratio is the
median over rounds of multiserve's over llama-server's.

Equal work: every response must hold 32 vectors of the model's size for 2048 prompt tokens, and
the two servers' vectors of the warm-up inputs must agree (cosine >= 0.99: the same pooling and
normalisation). Target: multiserve >= 1.0x llama-server. Timings on a shared machine drift, so
only the ratio within one invocation means anything; the CPU time other processes took is
printed, and PASS/MISS are marked when it exceeds 5%. The exit status is 1 on a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common.equal_work import Work, judged, work_notes
from benchmarks.common.machine import machine_info
from benchmarks.common.noise import NOISY_PERCENT, cpu_sample, interference
from benchmarks.common.output import console, out
from benchmarks.common.servers import (
    ServerCommand,
    build_llama_server,
    llama_server_command,
    multiserve_command,
    port_taken,
    run_benchmark,
    serving,
)
from benchmarks.common.sse import loopback_client
from benchmarks.common.verdict import add_no_fail, exit_status, runs_text, target_table, verdict
from multiserve.models.default import DEFAULT_MODEL_ID, default_model_path

INPUTS = 32  # per request
INPUT_TOKENS = 64
FIRST_TOKEN, LAST_TOKEN = 1000, 200_000  # ordinary text pieces of Gemma 3's vocabulary
N_EMBD = 640  # Gemma 3 270M's embedding size
MIN_AGREEMENT = 0.99  # cosine of the two servers' vectors of one input
TARGET = 1.0  # multiserve inputs/s over llama-server's
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 1800.0


def inputs_of(request: int) -> list[list[int]]:
    """Request `request`'s inputs: 32 lists of 64 token ids, different for every request."""
    rng = np.random.default_rng(request)
    return rng.integers(FIRST_TOKEN, LAST_TOKEN, (INPUTS, INPUT_TOKENS)).tolist()


def servers(binary: Path, port: int, threads: int, slots: int) -> list[ServerCommand]:
    ours = multiserve_command(port, "--threads", str(threads))
    options = ["--embeddings", "--pooling", "mean", "-tb", str(threads), "--no-warmup"]
    model, n_ctx = default_model_path(), slots * 2 * INPUT_TOKENS
    theirs = llama_server_command(binary, model, port, threads, n_ctx, slots, *options)
    return [ServerCommand("multiserve", ours), ServerCommand("llama-server", theirs)]


@dataclass
class Run:
    """One server's timed phase."""

    inputs_per_s: float
    seconds: float
    others_percent: float  # CPU time of other processes and steal, % of the machine's


async def embed(client: httpx.AsyncClient, request: int) -> tuple[np.ndarray, int]:
    """One request's vectors, and how many inputs it embedded: all 32, or 0 when the response
    holds anything but 32 vectors of the model's size for 2048 prompt tokens."""
    body = {"model": DEFAULT_MODEL_ID, "input": inputs_of(request), "encoding_format": "float"}
    response = await client.post("/v1/embeddings", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
    reply = response.json()
    vectors = np.array([item["embedding"] for item in reply["data"]])
    tokens = reply.get("usage", {}).get("prompt_tokens")
    whole = vectors.shape == (INPUTS, N_EMBD) and tokens == INPUTS * INPUT_TOKENS
    return vectors, INPUTS if whole else 0


async def measure(
    port: int, pid: int, clients: int, requests: int, work: Work
) -> tuple[Run, np.ndarray]:
    """Warm up with request 0 (its vectors are returned), then time `requests` requests; the
    inputs they embed, of those asked, are added to `work`."""
    async with loopback_client(port, clients, keepalive=False, timeout_s=REQUEST_TIMEOUT_S) as http:
        warm, _ = await embed(http, 0)
        pending = iter(range(1, requests + 1))
        done_before = work.done

        async def client() -> None:
            for request in pending:
                _, done = await embed(http, request)
                work.add(done, INPUTS)

        before = cpu_sample(pid)
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - started
        noise = interference(before, cpu_sample(pid))
    others = noise["steal_percent"] + noise["others_percent"]
    return Run((work.done - done_before) / seconds, seconds, others), warm


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest cosine between the two servers' vectors of one input."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.embeddings", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4, help="requests kept in flight")
    parser.add_argument("--requests", type=int, default=8, help="timed requests per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each server")
    parser.add_argument("--llama-slots", type=int, default=INPUTS, help="llama-server's -np")
    parser.add_argument("--port", type=int, default=8098)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    add_no_fail(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if port_taken(args.port):
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pair = servers(build_llama_server(), args.port, args.threads, args.llama_slots)
    runs: dict[str, list[Run]] = {server.name: [] for server in pair}
    works = {server.name: Work() for server in pair}
    warm: dict[str, np.ndarray] = {}
    for round_ in range(args.rounds):
        for server in pair if round_ % 2 == 0 else pair[::-1]:
            console.print(f"round {round_ + 1}: {server.name}")
            log = args.out_dir / f"embeddings-{server.name}.log"
            with serving(
                server.name, server.command, args.port, log, timeout_s=READY_TIMEOUT_S
            ) as running:
                run, warm[server.name] = asyncio.run(
                    measure(
                        args.port,
                        running.proc.pid,
                        args.clients,
                        args.requests,
                        works[server.name],
                    )
                )
            runs[server.name].append(run)

    ours, theirs = runs["multiserve"], runs["llama-server"]
    ratios = [a.inputs_per_s / b.inputs_per_s for a, b in zip(ours, theirs, strict=True)]
    ratio = statistics.median(ratios)
    agree = agreement(warm["multiserve"], warm["llama-server"])
    ok = judged(ratio >= TARGET, works["multiserve"], works["llama-server"])
    if agree < MIN_AGREEMENT:
        ok = False  # other vectors (pooling, normalisation): not the work asked of multiserve
    noisy = any(r.others_percent > NOISY_PERCENT for rs in runs.values() for r in rs)

    machine = machine_info()
    out.print(f"command: {shlex.join(sys.orig_argv)}")
    out.print(
        f"machine: {machine['machine']}, {machine['cpu']}, {machine['logical_cores']} logical / "
        f"{machine['physical_cores']} physical cores; llama-cpp-python "
        f"{machine['llama_cpp_python']}"
    )
    out.print(
        f"model: {default_model_path().name}; --threads {args.threads}, {args.clients} clients, "
        f"{args.requests} requests of {INPUTS} inputs x {INPUT_TOKENS} tokens, mean pooling"
    )
    for server in pair:
        out.print(f"{server.name}: {shlex.join(server.command)}", highlight=False)
    out.print(
        "CPU not ours (steal and other processes), per run: "
        + ", ".join(
            f"{name} {runs_text([r.others_percent for r in rs], fmt='{:.1f}%')}"
            for name, rs in runs.items()
        )
    )
    out.print(
        f"agreement of the two servers' vectors: lowest cosine {agree:.5f} "
        f"(at least {MIN_AGREEMENT} for a comparison)"
    )
    if notes := work_notes(works):
        out.print(f"[yellow]{notes}")
    table = target_table(f"embeddings throughput (median of {args.rounds} round(s))")
    for name, rs in runs.items():
        values = [r.inputs_per_s for r in rs]
        table.add_row(
            f"{name} (inputs/s)",
            f"{statistics.median(values):.2f}",
            runs_text(values, fmt="{:.2f}"),
            "-",
            "-",
        )
    table.add_section()
    table.add_row(
        "multiserve / llama-server",
        f"{ratio:.2f}",
        runs_text(ratios, fmt="{:.2f}"),
        f">= {TARGET:g}",
        verdict(ok, noisy),
    )
    out.print(table)
    results = args.out_dir / "embeddings.json"
    results.write_text(
        json.dumps(
            {
                "command": shlex.join(sys.orig_argv),
                "machine": machine,
                "settings": {k: str(v) for k, v in vars(args).items()},
                "servers": {server.name: server.command for server in pair},
                "runs": {name: [asdict(r) for r in rs] for name, rs in runs.items()},
                "ratio": ratio,
                "agreement": agree,
                "noisy": noisy,
                "target": TARGET,
            },
            indent=2,
        )
        + "\n"
    )
    out.print(f"results: {results}")
    return exit_status([] if ok is not False else ["embeddings inputs/s"], args.no_fail)


if __name__ == "__main__":
    run_benchmark(main)
