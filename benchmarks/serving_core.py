"""Serving-core benchmark: the multiserve server against raw llama.cpp on the same GGUF and cores.

    .venv/bin/python -m benchmarks.serving_core [--threads 2] [--tokens 128] [--concurrency 8]
                                                [--port 8093] [--out results.json] [--no-fail]

Why it is built this way:

* The anchor runs in the same invocation. A raw llama.cpp decode loop (llama-cpp-python's
  low-level API, no server, no IPC, no HTTP) on the same model file, thread count and context
  settings as the server's worker runs in a spawned process that exits before the server is
  measured, so the two never compute at the same time.
* Ratios, not absolute times, are what the targets judge. Timings on shared CPU machines drift by
  tens of percent from one minute to the next; "the server reaches 95% of what llama.cpp itself
  does on this machine, right now" survives that noise, while "N tokens/s" does not.
* Anchor and server take turns: three rounds of raw llama.cpp (in a fresh process, the server
  idle) and the server doing the same work, the side that goes first alternating, and a ratio
  is the median of the three rounds' ratios, so neither drift between minutes nor an order
  effect lands on one side of it. Medians of each side are printed too.
* Noise is measured, not only suffered: the CPU time that neither this benchmark nor its
  children used (other processes, hypervisor steal) is printed per phase, and PASS/MISS get a
  "?" when it exceeds 5%.
* Targets: the server's single stream and its N concurrent streams each reach 95% of raw
  llama.cpp doing the same work (1 sequence; a batch of N), judged where the server's HTTP side
  and the client have a core of their own. With every core running llama.cpp (2 threads on 2
  cores here) they take their CPU (about 1 ms per streamed token together) from its spinning
  threads, which then wait for each other: that pair is printed, and when the run leaves no
  core free a second pair at `--threads - 1` is run and judged. Default sampling (what a client
  that sets nothing gets: temperature 1, the full distribution) reaches 95% of greedy at N
  streams. "server N / server 1" is printed without a target. The exit status is 1 when a target
  is missed (`--no-fail` for exploration).

Server numbers come from streamed `/v1/completions` with `ignore_eos` (greedy, then default), so
every request produces exactly `--tokens` tokens (a server that produces fewer did less work
than the anchor, and its ratios cannot pass). Single-stream decode speed is timed from the
first streamed token to the last ((completion_tokens - 1) / (t_last - t_first)), which excludes
prefill just like the anchor's decode loop. The concurrent decode throughput is the sum of the
streams' decode speeds (they run side by side), which leaves prefill out as the anchor's batched
loop does; the total over the wall time, prefill and TTFT included, is printed beside it.
Only loopback traffic: the server binds 127.0.0.1 and the client ignores proxy settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.common.equal_work import Work, judged
from benchmarks.common.llama_anchor import RawLlama, in_fresh_process, raw_llama
from benchmarks.common.machine import machine_info
from benchmarks.common.noise import cpu_sample, interference, is_noisy
from benchmarks.common.output import console, out
from benchmarks.common.prompts import prompt_text
from benchmarks.common.servers import (
    RunningServer,
    multiserve_command,
    port_taken,
    run_benchmark,
    serving,
)
from benchmarks.common.sse import Streamed, complete, loopback_client
from benchmarks.common.verdict import add_no_fail, exit_status, runs_text, target_table, verdict
from multiserve.config import ModelSpec
from multiserve.models.default import DEFAULT_MODEL_ID, default_model_path

REPEATS = 3
WARMUP_REQUESTS = 2
WARMUP_TOKENS = 32
SERVER_CTX = 4096  # the server's shape, which the anchor's context copies exactly
SERVER_SLOTS = 8
TARGET_SINGLE_VS_RAW = 0.95
TARGET_CONCURRENT_VS_RAW = 0.95  # the server's 8 streams against raw llama.cpp's batch of 8
TARGET_SAMPLED_VS_GREEDY = 0.95  # the server's default sampling against its greedy decoding
# The API's defaults (temperature 1, top_p 1: the full distribution), as a client that sets
# nothing gets them; `null` is what the OpenAI client sends for an unset field.
DEFAULT_SAMPLING: dict[str, object] = {"temperature": None}


# -- anchor: raw llama.cpp in a spawned process ---------------------------------------------------


def _decode_rate(raw: RawLlama, prompts: Sequence[Sequence[int]], steps: int) -> float:
    """Prefill `prompts` (one sequence each), then time `steps` greedy steps; aggregate tok/s."""
    raw.clear()
    rows: list[tuple[int, int, int, bool]] = []
    last_rows: list[int] = []
    for seq, prompt in enumerate(prompts):
        rows += [(tok, pos, seq, pos == len(prompt) - 1) for pos, tok in enumerate(prompt)]
        last_rows.append(len(rows) - 1)
    raw.decode(rows)
    tokens = [raw.argmax(row) for row in last_rows]
    positions = [len(p) for p in prompts]
    n = len(prompts)
    start = time.perf_counter()
    for _ in range(steps):
        raw.decode([(tokens[s], positions[s], s, True) for s in range(n)])
        tokens = [raw.argmax(s) for s in range(n)]
        positions = [p + 1 for p in positions]
    return n * steps / (time.perf_counter() - start)


def run_anchor(
    model_path: str, threads: int, tokens: int, n_seq: int, repeats: int = REPEATS
) -> dict[str, Any]:
    """Raw llama.cpp decode loops on the very context the server's worker creates for the
    embedded model as `serve` runs it; runs in a spawned process (top level so it pickles)."""
    spec = ModelSpec(id="anchor", path=Path(model_path), n_ctx=SERVER_CTX, n_parallel=SERVER_SLOTS)
    with raw_llama(spec, threads) as raw:
        prompts = [raw.tokenize(prompt_text(10_000 + i)) for i in range(n_seq)]
        _decode_rate(raw, prompts[:1], 8)  # warm-up: page in the weights
        _decode_rate(raw, prompts, 8)
        single = [_decode_rate(raw, prompts[:1], tokens) for _ in range(repeats)]
        batched = [_decode_rate(raw, prompts, tokens) for _ in range(repeats)] if n_seq > 1 else []
        n_ctx = raw.config.n_ctx_per_seq * raw.config.n_seq_max
    return {
        "single_tok_s": single,
        "batched_tok_s": batched,
        "prompt_tokens": [len(p) for p in prompts],
        "n_ctx": n_ctx,
    }


# -- the server -----------------------------------------------------------------------------------


def server_command(port: int, threads: int) -> list[str]:
    shape = ["--ctx", str(SERVER_CTX), "--parallel", str(SERVER_SLOTS)]
    return multiserve_command(port, "--threads", str(threads), *shape)


async def stream_completion(
    client: httpx.AsyncClient,
    prompt: str,
    tokens: int,
    work: Work | None = None,
    sampling: dict[str, object] | None = None,
) -> Streamed:
    """One streamed completion of exactly `tokens` tokens, greedy unless `sampling` says
    otherwise, timed per chunk (and counted in `work`)."""
    request = complete(client, DEFAULT_MODEL_ID, prompt, tokens, **(sampling or {}))
    result = (await request).raise_for_failure()
    if result.t_first is None or result.completion_tokens < 2:
        n = result.completion_tokens
        raise RuntimeError(f"stream produced {n} tokens; usage chunk missing?")
    if result.completion_tokens != tokens:
        console.print(f"[yellow]warning: asked for {tokens} tokens, got {result.completion_tokens}")
    if work is not None:
        work.add(result.completion_tokens, tokens)
    return result


async def concurrent_round(
    client: httpx.AsyncClient,
    prompts: Sequence[str],
    tokens: int,
    work: Work,
    sampling: dict[str, object] | None = None,
) -> dict[str, float]:
    """Start one stream per prompt together; aggregate tok/s over the wall time to the last end."""
    start = time.perf_counter()
    streams = (stream_completion(client, p, tokens, work, sampling) for p in prompts)
    results = await asyncio.gather(*streams)
    wall = max(r.t_end for r in results) - start
    total = sum(r.completion_tokens for r in results)
    ttfts = [r.ttft for r in results]
    return {
        "aggregate_tok_s": total / wall,
        # all streams decode side by side: the sum of their rates is the decode throughput,
        # prefill left out as the anchor's batched loop leaves it out
        "decode_tok_s": sum(r.decode_tok_s for r in results),
        "wall_s": wall,
        "completion_tokens": total,
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p99_s": float(np.percentile(ttfts, 99)),
    }


async def anchor_round(
    model: Path, threads: int, args: argparse.Namespace, anchor: dict[str, list[float]], i: int
) -> None:
    """One round of raw llama.cpp (1 sequence, a batch of N) in a fresh process, added to
    `anchor`."""
    raw = await asyncio.to_thread(
        in_fresh_process, run_anchor, str(model), threads, args.tokens, args.concurrency, 1
    )
    anchor["single_tok_s"] += raw["single_tok_s"]
    anchor["batched_tok_s"] += raw["batched_tok_s"]
    console.print(
        f"anchor, round {i + 1}: {raw['single_tok_s'][0]:.1f} tok/s at 1, "
        f"{raw['batched_tok_s'][0]:.1f} at {args.concurrency}"
    )


async def measure_server(
    server: RunningServer, model: Path, threads: int, args: argparse.Namespace, sampled: bool
) -> dict[str, Any]:
    """REPEATS rounds of: raw llama.cpp (1 sequence, a batch of N) in a fresh process while the
    server idles, and the server (1 stream; N streams), greedy, the first side alternating;
    then (if `sampled`) the server's default sampling. Interleaving pairs each server figure
    with an anchor measured a moment apart, so drift between minutes does not land on one side
    of a ratio."""
    tokens, concurrency = args.tokens, args.concurrency
    console.print(f"server: model loaded after {server.ready_s:.1f}s; warming up")
    work = Work()  # the measured requests' tokens against what they asked for
    result: dict[str, Any] = {"load_s": server.ready_s}
    anchor: dict[str, list[float]] = {"single_tok_s": [], "batched_tok_s": []}
    async with loopback_client(server.port, concurrency + 4) as client:
        next_prompt = iter(range(1_000_000))
        for _ in range(WARMUP_REQUESTS):
            await stream_completion(client, prompt_text(next(next_prompt)), WARMUP_TOKENS)
        kinds = {"": None, "sampled_": DEFAULT_SAMPLING} if sampled else {"": None}
        for kind, sampling in kinds.items():
            singles: list[Streamed] = []
            rounds: list[dict[str, float]] = []
            for i in range(REPEATS):
                # the side that goes first alternates, so an order effect cancels out
                anchor_first = not kind and i % 2 == 0
                if anchor_first:
                    await anchor_round(model, threads, args, anchor, i)
                prompt = prompt_text(next(next_prompt))
                singles.append(await stream_completion(client, prompt, tokens, work, sampling))
                prompts = [prompt_text(next(next_prompt)) for _ in range(concurrency)]
                rounds.append(await concurrent_round(client, prompts, tokens, work, sampling))
                console.print(
                    f"server {kind}round {i + 1}: {singles[-1].decode_tok_s:.1f} tok/s at 1, "
                    f"{rounds[-1]['decode_tok_s']:.1f} at {concurrency}"
                )
                if not kind and not anchor_first:
                    await anchor_round(model, threads, args, anchor, i)
            result[f"{kind}single_tok_s"] = [r.decode_tok_s for r in singles]
            result[f"{kind}single_ttft_s"] = [r.ttft for r in singles]
            result[f"{kind}concurrent_tok_s"] = [r["decode_tok_s"] for r in rounds]
            result[f"{kind}concurrent_wall_tok_s"] = [r["aggregate_tok_s"] for r in rounds]
            result[f"{kind}concurrent_ttft_mean_s"] = [r["ttft_mean_s"] for r in rounds]
            result[f"{kind}concurrent_ttft_p99_s"] = [r["ttft_p99_s"] for r in rounds]
            result[f"{kind}concurrent_rounds"] = rounds
    return result | {"work": asdict(work), "anchor": anchor}


# -- report ---------------------------------------------------------------------------------------


@dataclass
class Summary:
    raw_single: float
    raw_batched: float
    server_single: float
    server_concurrent: float
    ttft_single_s: float
    ttft_concurrent_mean_s: float
    ttft_concurrent_p99_s: float
    server_single_vs_raw: float
    server_concurrent_vs_single: float
    server_concurrent_vs_raw_batched: float
    raw_batched_vs_single: float  # how far llama.cpp itself scales with batch size here
    sampled_single: float
    sampled_concurrent: float
    sampled_vs_greedy_single: float
    sampled_vs_greedy_concurrent: float
    # with a core left to the HTTP side and the client (threads - 1), when the main run has none
    spare_core_threads: int | None = None
    spare_core_raw_single: float | None = None
    spare_core_server_single: float | None = None
    spare_core_raw_batched: float | None = None
    spare_core_server_concurrent: float | None = None
    spare_core_single_vs_raw: float | None = None
    spare_core_concurrent_vs_raw_batched: float | None = None


def _paired(server: Sequence[float], anchor: Sequence[float]) -> float:
    """The median of the round-by-round ratios (each server figure over the anchor's measured
    just before it)."""
    return statistics.median(s / a for s, a in zip(server, anchor, strict=True))


def summarize(
    anchor: dict[str, Any],
    server: dict[str, Any],
    spare: tuple[int, dict[str, Any], dict[str, Any]] | None,
) -> Summary:
    med = statistics.median
    raw_single, raw_batched = med(anchor["single_tok_s"]), med(anchor["batched_tok_s"])
    single, concurrent = med(server["single_tok_s"]), med(server["concurrent_tok_s"])
    sampled_single = med(server["sampled_single_tok_s"])
    sampled_concurrent = med(server["sampled_concurrent_tok_s"])
    summary = Summary(
        raw_single=raw_single,
        raw_batched=raw_batched,
        server_single=single,
        server_concurrent=concurrent,
        ttft_single_s=med(server["single_ttft_s"]),
        ttft_concurrent_mean_s=med(server["concurrent_ttft_mean_s"]),
        ttft_concurrent_p99_s=med(server["concurrent_ttft_p99_s"]),
        server_single_vs_raw=_paired(server["single_tok_s"], anchor["single_tok_s"]),
        server_concurrent_vs_single=concurrent / single,
        server_concurrent_vs_raw_batched=_paired(
            server["concurrent_tok_s"], anchor["batched_tok_s"]
        ),
        raw_batched_vs_single=raw_batched / raw_single,
        sampled_single=sampled_single,
        sampled_concurrent=sampled_concurrent,
        sampled_vs_greedy_single=sampled_single / single,
        sampled_vs_greedy_concurrent=sampled_concurrent / concurrent,
    )
    if spare is not None:
        threads, spare_anchor, spare_server = spare
        summary.spare_core_threads = threads
        summary.spare_core_raw_single = med(spare_anchor["single_tok_s"])
        summary.spare_core_server_single = med(spare_server["single_tok_s"])
        summary.spare_core_raw_batched = med(spare_anchor["batched_tok_s"])
        summary.spare_core_server_concurrent = med(spare_server["concurrent_tok_s"])
        summary.spare_core_single_vs_raw = _paired(
            spare_server["single_tok_s"], spare_anchor["single_tok_s"]
        )
        summary.spare_core_concurrent_vs_raw_batched = _paired(
            spare_server["concurrent_tok_s"], spare_anchor["batched_tok_s"]
        )
    return summary


def targets(s: Summary, n: int) -> list[tuple[str, float, float | None]]:
    """(label, ratio, minimum or None) of every ratio, in the table's order. Server against raw
    llama.cpp is judged where the server's HTTP side and the client have a core of their own:
    with every core computing, the ratio measures the machine (they take their CPU from
    llama.cpp's spinning threads), not the server, and llama-server pays it too
    (benchmarks.real_traffic compares the two)."""
    here = s.spare_core_threads is None
    single, concurrent = (TARGET_SINGLE_VS_RAW, TARGET_CONCURRENT_VS_RAW) if here else (None, None)
    rows = [
        ("server 1 / raw 1", s.server_single_vs_raw, single),
        (f"server {n} / server 1", s.server_concurrent_vs_single, None),
        (f"server {n} / raw {n}", s.server_concurrent_vs_raw_batched, concurrent),
        (f"raw {n} / raw 1 (reference)", s.raw_batched_vs_single, None),
        ("default sampling / greedy, 1 stream", s.sampled_vs_greedy_single, None),
        (
            f"default sampling / greedy, {n} streams",
            s.sampled_vs_greedy_concurrent,
            TARGET_SAMPLED_VS_GREEDY,
        ),
    ]
    if s.spare_core_single_vs_raw is not None and s.spare_core_concurrent_vs_raw_batched:
        spare = f"{s.spare_core_threads} thread(s): a core left for HTTP"
        rows += [
            (f"server 1 / raw 1, {spare}", s.spare_core_single_vs_raw, TARGET_SINGLE_VS_RAW),
            (
                f"server {n} / raw {n}, {spare}",
                s.spare_core_concurrent_vs_raw_batched,
                TARGET_CONCURRENT_VS_RAW,
            ),
        ]
    return rows


def passed(value: float, target: float, work: Work) -> bool:
    """The ratio reaches its target, and the server did all the work the anchor did."""
    return bool(judged(value >= target, work, None))


def render_table(
    s: Summary,
    anchor: dict[str, Any],
    server: dict[str, Any],
    spare: tuple[int, dict[str, Any], dict[str, Any]] | None,
    n: int,
    noisy: bool,
) -> Table:
    table = target_table("multiserve serving core vs raw llama.cpp (median of 3 runs each)")
    rates = [
        ("raw llama.cpp, 1 seq (tok/s)", s.raw_single, anchor["single_tok_s"]),
        (f"raw llama.cpp, {n} seq (tok/s)", s.raw_batched, anchor["batched_tok_s"]),
        ("server, 1 stream decode (tok/s)", s.server_single, server["single_tok_s"]),
        (f"server, {n} streams decode (tok/s)", s.server_concurrent, server["concurrent_tok_s"]),
        (
            f"server, {n} streams, over the wall time with prefill (tok/s)",
            statistics.median(server["concurrent_wall_tok_s"]),
            server["concurrent_wall_tok_s"],
        ),
        (
            "server, 1 stream, default sampling (tok/s)",
            s.sampled_single,
            server["sampled_single_tok_s"],
        ),
        (
            f"server, {n} streams decode, default sampling (tok/s)",
            s.sampled_concurrent,
            server["sampled_concurrent_tok_s"],
        ),
    ]
    if spare is not None:
        threads, spare_anchor, spare_server = spare
        spare_rates = [
            ("raw llama.cpp, 1 seq", s.spare_core_raw_single, spare_anchor["single_tok_s"]),
            (f"raw llama.cpp, {n} seq", s.spare_core_raw_batched, spare_anchor["batched_tok_s"]),
            ("server, 1 stream decode", s.spare_core_server_single, spare_server["single_tok_s"]),
            (
                f"server, {n} streams decode",
                s.spare_core_server_concurrent,
                spare_server["concurrent_tok_s"],
            ),
        ]
        rates += [
            (f"{label}, {threads} thread(s) (tok/s)", value, values)
            for label, value, values in spare_rates
        ]
    for label, value, values in rates:
        table.add_row(label, f"{value:.1f}", runs_text(values), "-", "-")
    ms = 1000.0
    ttfts = [
        ("TTFT, 1 stream (ms)", s.ttft_single_s, server["single_ttft_s"]),
        (
            f"TTFT, {n} streams mean (ms)",
            s.ttft_concurrent_mean_s,
            server["concurrent_ttft_mean_s"],
        ),
        (f"TTFT, {n} streams p99 (ms)", s.ttft_concurrent_p99_s, server["concurrent_ttft_p99_s"]),
    ]
    for label, value, values in ttfts:
        table.add_row(label, f"{value * ms:.0f}", runs_text(values, ms, "{:.0f}"), "-", "-")
    table.add_section()
    work = Work(**server["work"])
    for label, value, target in targets(s, n):
        cells = ("-", "-")
        if target is not None:
            cells = (f">= {target:g}", verdict(passed(value, target, work), noisy))
        table.add_row(label, f"{value:.3f}", "", *cells)
    return table


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving_core", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--threads", type=int, default=2, help="compute threads (default 2)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence (128)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="concurrent streams and anchor batch size, at most the server's 8 slots (8)",
    )
    parser.add_argument("--port", type=int, default=8093, help="server port on 127.0.0.1 (8093)")
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    add_no_fail(parser)
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.threads < 1 or not 1 <= args.concurrency <= 8:
        parser.error("need --tokens >= 2, --threads >= 1 and 1 <= --concurrency <= 8")
    return args


def measure_phase(
    args: argparse.Namespace, model: Path, threads: int, sampled: bool = True
) -> dict[str, Any]:
    """Run the server for the measurement only (its log shown if anything goes wrong); the
    anchor's rounds run between its own."""
    with tempfile.TemporaryDirectory(prefix="serving-core-") as tmp:
        log = Path(tmp) / "server.log"
        command = server_command(args.port, threads)
        with serving("server", command, args.port, log, loaded=[DEFAULT_MODEL_ID]) as server:
            measured = asyncio.run(measure_server(server, model, threads, args, sampled))
    return measured | {"command": command}


def spare_core_threads(threads: int) -> int | None:
    """Threads for the single-stream pair judged with a core left to the HTTP side and the
    client, when `threads` leaves none (None when it does, or when one thread is all there is)."""
    usable = len(os.sched_getaffinity(0))
    return threads - 1 if threads >= usable and threads > 1 else None


def print_report(out: Console, report: dict[str, Any], summary: Summary) -> None:
    machine, args = report["machine"], report["settings"]
    out.print(f"command: {report['command']}")
    out.print(
        f"machine: {machine['machine']}, {machine['cpu']}, {machine['logical_cores']} logical / "
        f"{machine['physical_cores']} physical cores ({machine['usable_cores']} usable); "
        f"llama-cpp-python {machine['llama_cpp_python']}"
    )
    out.print(
        f"model: {Path(report['model']).name}; --threads {args['threads']}, "
        f"--tokens {args['tokens']}, --concurrency {args['concurrency']}"
    )
    out.print(
        "CPU not ours (steal by other guests / other processes): "
        + ", ".join(
            f"{phase} {n['steal_percent']:.1f}% / {n['others_percent']:.1f}%"
            for phase, n in report["cpu_interference"].items()
        )
    )
    if report["noisy"]:
        out.print("[yellow]warning: the machine was busy with other work; these numbers are noisy")
    spare = report.get("spare_core")
    spare_runs = (spare["threads"], spare["anchor"], spare["server"]) if spare else None
    table = render_table(
        summary,
        report["anchor"],
        report["server"],
        spare_runs,
        args["concurrency"],
        report["noisy"],
    )
    out.print(table)
    if less := Work(**report["server"]["work"]).describe("the server"):
        out.print(f"[red]{less}: its ratios do not count as a pass")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model = default_model_path()
    if port_taken(args.port):
        return 2

    console.print(f"raw llama.cpp and the server, {args.threads} threads, {model.name}")
    cpu_before = cpu_sample()
    server = measure_phase(args, model, args.threads)
    anchor = server.pop("anchor")
    cpu_after = cpu_sample()
    noise = {"all cores": interference(cpu_before, cpu_after)}
    spare: tuple[int, dict[str, Any], dict[str, Any]] | None = None
    if (threads := spare_core_threads(args.threads)) is not None:
        console.print(f"with a core left for HTTP and the client: {threads} thread(s)")
        spare_server = measure_phase(args, model, threads, sampled=False)
        spare = (threads, spare_server.pop("anchor"), spare_server)
        noise["a core left"] = interference(cpu_after, cpu_sample())

    summary = summarize(anchor, server, spare)
    report = {
        "command": shlex.join(sys.orig_argv),
        "server_command": server["command"],
        "machine": machine_info(),
        "cpu_interference": noise,
        "noisy": is_noisy(noise),
        "model": str(model),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"repeats": REPEATS},
        "summary": asdict(summary),
        "targets": {
            "server_single_vs_raw": TARGET_SINGLE_VS_RAW,
            "server_concurrent_vs_raw_batched": TARGET_CONCURRENT_VS_RAW,
            "sampled_vs_greedy_concurrent": TARGET_SAMPLED_VS_GREEDY,
        },
        "anchor": anchor,
        "server": server,
    }
    if spare is not None:
        report["spare_core"] = dict(zip(("threads", "anchor", "server"), spare, strict=True))
    print_report(out, report, summary)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        out.print(f"wrote {args.out}")
    work = Work(**server["work"])
    missed = [
        label
        for label, value, target in targets(summary, args.concurrency)
        if target is not None and not passed(value, target, work)
    ]
    return exit_status(missed, args.no_fail)


if __name__ == "__main__":
    run_benchmark(main)
