"""multiserve against its peers on the same machine, model, threads and bench settings.

    .venv/bin/python -m benchmarks.peers [--threads 2] [--concurrency 8] [--requests 32]
                                         [--output-tokens 128] [--out-dir benchmarks/results]
                                         [--no-fail]

Runs each server one after the other (never two at once, so none steals the other's cores),
loads it with the same `multiserve bench` run, and prints the ratios and the `multiserve compare`
table. Peers: llama-cpp-python's own server (`python -m llama_cpp.server`, same llama.cpp build,
started with `--interrupt_requests False`: by default it cuts off a stream in flight whenever a
new request arrives, which no client of a shared endpoint wants), and llama.cpp's `llama-server`
when it is on PATH. Timings here are noisy, so only ratios within one invocation mean anything.

Equal work: every request asks for `--output-tokens` tokens with `ignore_eos`, which
llama-cpp-python's server ignores, so it may stop early at the model's end of text. Each peer's
completion tokens are checked request by request against what was asked; a peer that did less
work is reported as such, and a target multiserve misses only against a peer that did less work
is not counted (NOT COUNTED, not MISS): the peer's speed there is no win.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common.equal_work import Work, judged, work_notes
from benchmarks.common.output import out
from benchmarks.common.servers import (
    ServerCommand,
    llama_cpp_python_command,
    llama_server_command,
    multiserve_command,
    port_taken,
    run_benchmark,
    serving,
)
from benchmarks.common.verdict import add_no_fail, exit_status, verdict
from multiserve.models.default import DEFAULT_MODEL_ID, default_model_path

READY_TIMEOUT_S = 180.0
TARGET_THROUGHPUT = 3.0  # multiserve / llama-cpp-python output tokens per second
TARGET_P99_TTFT = 0.3  # multiserve / llama-cpp-python p99 time to first token


def peers(model: Path, threads: int, ctx: int, port: int) -> list[ServerCommand]:
    """multiserve, llama-cpp-python's server, and llama-server if installed: same GGUF, threads."""
    ours = multiserve_command(port, "--threads", str(threads), "--ctx", str(ctx))
    anchor = llama_cpp_python_command(model, port, threads, ctx)
    found = [
        ServerCommand("multiserve", ours),
        ServerCommand("llama-cpp-python", anchor, ready_path="/v1/models"),
    ]
    if binary := shutil.which("llama-server"):
        command = llama_server_command(binary, model, port, threads, ctx * 8, 8, "-cb")
        found.append(ServerCommand("llama-server", command))
    return found


def bench(url: str, model: str, args: argparse.Namespace, out_file: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "multiserve", "bench", "--url", url, "--model", model]
    command += ["--endpoint", "completions", "--concurrency", str(args.concurrency)]
    command += ["--requests", str(args.requests), "--warmup", "2"]
    command += ["--input-tokens", str(args.input_tokens)]
    command += ["--output-tokens", str(args.output_tokens), "--ignore-eos"]
    command += ["--temperature", "0", "--seed", "1", "--out", str(out_file), "--quiet"]
    subprocess.run(command, check=True)
    return json.loads(out_file.read_text())


def work_done(result: dict[str, Any], asked: int) -> Work:
    """Completion tokens of every measured request against `asked` (a failed request: none)."""
    work = Work()
    for point in result["points"]:
        for record in point["records"]:
            work.add(record["output_tokens"] if record["success"] else 0, asked)
    return work


def ratio_line(
    what: str, ours: float, theirs: float, ratio: float, target: str, ok: bool | None, fmt: str
) -> str:
    return (
        f"{what}: multiserve {ours:{fmt}}, llama-cpp-python {theirs:{fmt}} -> {ratio:.2f}x "
        f"(target {target}x: {verdict(ok)})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--input-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=4096, help="context per sequence")
    parser.add_argument("--port", type=int, default=8095)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    add_no_fail(parser)
    args = parser.parse_args(argv)
    if port_taken(args.port):
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = default_model_path()
    results: dict[str, dict[str, Any]] = {}
    files: list[Path] = []
    for peer in peers(model, args.threads, args.ctx, args.port):
        log = args.out_dir / f"{peer.name}.log"
        out_file = args.out_dir / f"{peer.name}.json"
        with serving(
            peer.name,
            peer.command,
            args.port,
            log,
            ready_path=peer.ready_path,
            timeout_s=READY_TIMEOUT_S,
        ) as server:
            results[peer.name] = bench(server.url, DEFAULT_MODEL_ID, args, out_file)
        files.append(out_file)

    works = {name: work_done(result, args.output_tokens) for name, result in results.items()}
    ours, anchor = results["multiserve"], results["llama-cpp-python"]
    our_work, anchor_work = works["multiserve"], works["llama-cpp-python"]
    throughput = ours["output_throughput"] / anchor["output_throughput"]
    p99_ttft = ours["p99_ttft_ms"] / anchor["p99_ttft_ms"]
    throughput_ok = judged(throughput >= TARGET_THROUGHPUT, our_work, anchor_work)
    p99_ttft_ok = judged(p99_ttft <= TARGET_P99_TTFT, our_work, anchor_work)
    out.print(
        f"\nconcurrency {args.concurrency}, {args.output_tokens} output tokens, "
        f"{args.threads} threads, {model.name}",
        highlight=False,
    )
    out.print(
        "work (completion tokens / asked): "
        + ", ".join(f"{name} {w.done}/{w.asked}" for name, w in works.items()),
        highlight=False,
    )
    if notes := work_notes(works):
        out.print(f"[yellow]{notes}")
    out.print(
        ratio_line(
            "output tok/s",
            ours["output_throughput"],
            anchor["output_throughput"],
            throughput,
            f">= {TARGET_THROUGHPUT}",
            throughput_ok,
            ".1f",
        ),
        highlight=False,
    )
    out.print(
        ratio_line(
            "p99 TTFT ms",
            ours["p99_ttft_ms"],
            anchor["p99_ttft_ms"],
            p99_ttft,
            f"<= {TARGET_P99_TTFT}",
            p99_ttft_ok,
            ".0f",
        )
        + "\n",
        highlight=False,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "multiserve",
            "compare",
            *map(str, [files[1], files[0], *files[2:]]),
        ],
        check=True,
    )
    missed = ["output tok/s"] if throughput_ok is False else []
    missed += ["p99 TTFT"] if p99_ttft_ok is False else []
    return exit_status(missed, args.no_fail)


if __name__ == "__main__":
    run_benchmark(main)
