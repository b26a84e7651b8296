"""multiserve against its peers on the same machine, model, threads and bench settings.

    .venv/bin/python benchmarks/peers.py [--threads 2] [--concurrency 8] [--requests 32]
                                         [--output-tokens 128] [--out-dir benchmarks/results]

Runs each server one after the other (never two at once, so none steals the other's cores),
loads it with the same `multiserve bench` run, and prints the ratios and the `multiserve compare`
table. Peers: llama-cpp-python's own server (`python -m llama_cpp.server`, same llama.cpp build,
started with `--interrupt_requests False`: by default it cuts off a stream in flight whenever a
new request arrives, which no client of a shared endpoint wants), and llama.cpp's `llama-server`
when it is on PATH. Timings here are noisy, so only ratios within one invocation mean anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from multiserve.models.default import DEFAULT_MODEL_ID, default_model_path
from serving_core import add_no_fail, exit_status, log_tail, port_in_use, running_server

HOST = "127.0.0.1"
READY_TIMEOUT_S = 180.0
TARGET_THROUGHPUT = 3.0  # multiserve / llama-cpp-python output tokens per second
TARGET_P99_TTFT = 0.3  # multiserve / llama-cpp-python p99 time to first token


@dataclass(frozen=True)
class Peer:
    name: str
    command: list[str]
    ready_path: str
    model: str


def peers(model: Path, threads: int, ctx: int, port: int) -> list[Peer]:
    """multiserve, llama-cpp-python's server, and llama-server if installed: same GGUF, threads."""
    common = ["--host", HOST, "--port", str(port)]
    found = [
        Peer(
            "multiserve",
            [
                sys.executable,
                "-m",
                "multiserve",
                "serve",
                *common,
                "--threads",
                str(threads),
                "--ctx",
                str(ctx),
            ],
            "/health",
            DEFAULT_MODEL_ID,
        ),
        Peer(
            "llama-cpp-python",
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                *common,
                "--n_threads",
                str(threads),
                "--n_threads_batch",
                str(threads),
                "--n_ctx",
                str(ctx),
                "--interrupt_requests",
                "False",
            ],
            "/v1/models",
            DEFAULT_MODEL_ID,
        ),
    ]
    llama_server = shutil.which("llama-server")
    if llama_server:
        found.append(
            Peer(
                "llama-server",
                [
                    llama_server,
                    "-m",
                    str(model),
                    *common,
                    "-t",
                    str(threads),
                    "-c",
                    str(ctx * 8),
                    "-np",
                    "8",
                    "-cb",
                ],
                "/health",
                DEFAULT_MODEL_ID,
            )
        )
    return found


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"not ready after {READY_TIMEOUT_S:.0f}s:\n{log_tail(log)}")


@contextlib.contextmanager
def serving(peer: Peer, port: int, log: Path) -> Iterator[str]:
    url = f"http://{HOST}:{port}"
    with running_server(peer.command, log) as proc:
        wait_ready(url + peer.ready_path, proc, log)
        yield url


def bench(url: str, model: str, args: argparse.Namespace, out: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "multiserve",
        "bench",
        "--url",
        url,
        "--model",
        model,
        "--endpoint",
        "completions",
        "--concurrency",
        str(args.concurrency),
        "--requests",
        str(args.requests),
        "--warmup",
        "2",
        "--input-tokens",
        str(args.input_tokens),
        "--output-tokens",
        str(args.output_tokens),
        "--ignore-eos",
        "--temperature",
        "0",
        "--seed",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    if port_in_use(args.port):
        print(f"port {args.port} is in use; pick another --port", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = default_model_path()
    results: dict[str, dict] = {}
    files: list[Path] = []
    for peer in peers(model, args.threads, args.ctx, args.port):
        log = args.out_dir / f"{peer.name}.log"
        out = args.out_dir / f"{peer.name}.json"
        print(f"== {peer.name}: {' '.join(peer.command)}", flush=True)
        with serving(peer, args.port, log) as url:
            results[peer.name] = bench(url, peer.model, args, out)
        files.append(out)

    ours, anchor = results["multiserve"], results["llama-cpp-python"]
    throughput = ours["output_throughput"] / anchor["output_throughput"]
    p99_ttft = ours["p99_ttft_ms"] / anchor["p99_ttft_ms"]
    print(
        f"\nconcurrency {args.concurrency}, {args.output_tokens} output tokens, "
        f"{args.threads} threads, {model.name}"
    )
    print(
        f"output tok/s: multiserve {ours['output_throughput']:.1f}, llama-cpp-python "
        f"{anchor['output_throughput']:.1f} -> {throughput:.2f}x "
        f"(target >= {TARGET_THROUGHPUT}x: {'PASS' if throughput >= TARGET_THROUGHPUT else 'MISS'})"
    )
    print(
        f"p99 TTFT ms: multiserve {ours['p99_ttft_ms']:.0f}, llama-cpp-python "
        f"{anchor['p99_ttft_ms']:.0f} -> {p99_ttft:.2f}x "
        f"(target <= {TARGET_P99_TTFT}x: {'PASS' if p99_ttft <= TARGET_P99_TTFT else 'MISS'})\n"
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
    missed = ["output tok/s"] if throughput < TARGET_THROUGHPUT else []
    missed += ["p99 TTFT"] if p99_ttft > TARGET_P99_TTFT else []
    return exit_status(missed, args.no_fail)


if __name__ == "__main__":
    sys.exit(main())
