"""Fleet benchmark: several models on one machine — core sharing, cold start, a request flood,
and traffic over more models than fit.

    .venv/bin/python -m benchmarks.fleet [--threads 2] [--tokens 64] [--port 8094]
                                         [--out results.json]
                                         [--only sharing,cold,cold_dropped,flood,rotation]
                                         [--no-fail]

What it measures, each on its own `multiserve serve --config <generated toml>` subprocess bound to
127.0.0.1 and serving the embedded model (`embedded:gemma-3-270m`) under the ids it needs:

1. Core sharing. Two different models (`m1`: the embedded Gemma 3 270M Q4_K_M; `m2`: the same
   requantized to Q8_0 by llama.cpp, so other weight bytes and kernels; 4 slots each, preloaded).
   Output tok/s of 4 streams to m1 alone, to m2 alone, then of 4 streams to each at once. With the
   compute lease (`share_cores = true`) the two busy models together should keep >= 0.9 of the
   cores: the sum over the models of (its tok/s while both run / its tok/s alone). The same
   two-model load on a server with `share_cores = false` is reported beside it without a target:
   it shows what the lease buys when both models' thread pools fight over the cores.
2. Cold start. Anchor: in a fresh spawned process, after `import llama_cpp`, the raw llama.cpp
   work of a cold model — load the file, create a context of the server's shape, read a short
   prompt and pick the first token greedily. Interpreter start and the import are timed and
   reported separately, not in the anchor: the server's pre-started spare worker has already paid
   them. multiserve: a warm server whose model is not loaded; the time from sending a streamed
   request to its first token. Target: multiserve <= 1.5 x raw. Run twice: with the file in the
   page cache (a model loaded again after an unload) and with its pages dropped before the
   anchor and before the server (`cold_dropped`: as after a reboot; posix_fadvise, no root).
3. Flood. One model with 2 slots and queue_limit 4 (capacity 6) gets 10 x capacity requests at
   once. Every admitted request must complete with all its tokens, every other one must be
   refused with 503 `queue_full` and a Retry-After header in under 50 ms, and nothing else may
   come back.
4. Rotation. Three models (`r1`-`r3`, 2 slots each) with room for two (`max_loaded_models = 2`).
   Concurrent traffic: one client per model sends 32-token requests back to back for 45 s. Then
   sequential traffic: one client cycles r1, r2, r3 six times. Each on a server with the default
   `model_turn` (15 s) and one with `model_turn = 0` (a busy model gives way at once). Reported:
   loads per request, requests served per model, latency. Target, concurrent traffic: with turns,
   every request served (none refused or failed), every model served, and at most a quarter of
   the loads per request that the same traffic causes without turns. The sequential cycle is
   reported without a target: with room for two of three models used strictly in turn, the least
   recently used model is always the next one asked for, so it reloads on every switch whatever
   the turn (a cyclic pattern defeats any LRU policy).

Why it is built this way:

* Anchors run in the same invocation, on the same file, threads and context shape as the server.
  Targets judge ratios, not absolute times: timings on small shared machines drift by tens of
  percent from one minute to the next, and "two busy models keep 90% of one model's throughput,
  right now, here" survives that where "N tokens/s" does not. For the same reason the two sides
  of a ratio are interleaved round by round (one model alone, then both; anchor, then server).
  The cold anchor runs while the server sits idle (no loaded model, a spare worker blocked on its
  pipe), so the two never compute at the same time.
* Every measurement is repeated three times and the median is reported, except the load
  without the lease: one round, as its collapse can make a round take minutes.
* Noise is measured, not only suffered: the CPU time that neither this benchmark nor its
  children used (other processes, hypervisor steal) is printed per phase, and PASS/MISS get a
  "?" when it exceeds 5%. The load average before each phase is printed too.

Requests are streamed `/v1/completions` with `ignore_eos` and greedy sampling, so every admitted
request produces exactly `max_tokens` tokens. Aggregate throughput is total completion tokens over
the wall time from sending the first request to the last one finishing (prefill included). The
flood's refusal latency is from writing a request to having read its whole 503 response, over
raw sockets opened beforehand with each request's bytes built beforehand (an HTTP library's own
CPU per request, 60 times over in one event loop, would be charged to the server). Only loopback
traffic: the servers bind 127.0.0.1 and the client ignores proxy settings.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.common.llama_anchor import import_llama, in_fresh_process, raw_llama
from benchmarks.common.machine import machine_info
from benchmarks.common.multiserve_config import config_text, model_table, serving_config
from benchmarks.common.noise import (
    cpu_sample,
    interference,
    is_noisy,
    others_percent,
)
from benchmarks.common.output import console, out
from benchmarks.common.page_cache import cached_share
from benchmarks.common.prompts import prompt_text
from benchmarks.common.raw_http import RawReply, connections, exchange, request_bytes
from benchmarks.common.second_model import q8_model
from benchmarks.common.server_control import settle, unload
from benchmarks.common.servers import RunningServer, port_taken, run_benchmark
from benchmarks.common.sse import (
    EXACT_GREEDY,
    Streamed,
    complete,
    loopback_client,
    require_complete,
)
from benchmarks.common.verdict import add_no_fail, exit_status, runs_text, target_table, verdict
from multiserve.config import EMBEDDED_MODEL, ModelSpec
from multiserve.models.default import default_model_path

PHASES = ("sharing", "cold", "cold_dropped", "flood", "rotation")
REPEATS = 3
# The context shape of the sharing and cold-start models, mirrored exactly by the cold anchor.
SHAPE = {"n_ctx": 1024, "n_parallel": 4, "step_tokens": 256}
STREAMS_PER_MODEL = 4
WARMUP_TOKENS = 8
COLD_TOKENS = 4  # the cold request only needs its first token; a few more check the stream
FLOOD_SLOTS = 2
FLOOD_QUEUE_LIMIT = 4
FLOOD_FACTOR = 10
FLOOD_TOKENS = 16
SHARING_MODELS = ("m1", "m2")
SHARING_NAMES = {"m1": "Gemma 3 270M Q4_K_M", "m2": "the same requantized to Q8_0"}
TARGET_SHARING = 0.9  # sum of the two models' shares of their alone tok/s, with the lease
TARGET_COLD = 1.5  # multiserve first token / raw load + first token
TARGET_REFUSAL_S = 0.050
ROTATION_MODELS = ("r1", "r2", "r3")  # three models, room for two (max_loaded_models = 2)
ROTATION_TOKENS = 32
ROTATION_SECONDS = 45.0  # concurrent traffic: each model's client loops for this long
ROTATION_CYCLES = 6  # sequential traffic: one client cycles through the models this often
ROTATION_TURNS = {"turns": 15.0, "no turns": 0.0}  # model_turn: the default, and none
TARGET_ROTATION_LOADS = 0.25  # loads per request with turns / without, concurrent traffic


# -- 1. core sharing -------------------------------------------------------------------------


async def load_round(
    client: httpx.AsyncClient, models: Sequence[str], tokens: int, prompts: Iterator[int]
) -> dict[str, Any]:
    """STREAMS_PER_MODEL streams to each model at once; aggregate tok/s to the last end."""
    jobs = [
        complete(client, model, prompt_text(next(prompts)), tokens)
        for model in models
        for _ in range(STREAMS_PER_MODEL)
    ]
    start = time.perf_counter()
    outcomes = await asyncio.gather(*jobs)
    require_complete(outcomes, tokens)
    wall = max(o.t_end for o in outcomes) - start
    per_model = {
        model: sum(o.completion_tokens for o in outcomes if o.model == model)
        / (max(o.t_end for o in outcomes if o.model == model) - start)
        for model in models
    }
    return {
        "aggregate_tok_s": sum(o.completion_tokens for o in outcomes) / wall,
        "wall_s": wall,
        "per_model_tok_s": per_model,
        "ttft_mean_s": statistics.fmean(o.ttft for o in outcomes),
    }


def _say_round(label: str, i: int, result: dict[str, Any]) -> None:
    per_model = ", ".join(f"{m} {v:.1f}" for m, v in result["per_model_tok_s"].items())
    rate, others = result["aggregate_tok_s"], result["others_percent"]
    console.print(
        f"sharing: {label}, round {i + 1}: {rate:.1f} tok/s ({per_model}); "
        f"CPU not ours {others:.0f}%"
    )


async def sharing_rounds(
    server: RunningServer, args: argparse.Namespace, loads: dict[str, Sequence[str]], repeats: int
) -> dict[str, list[dict[str, Any]]]:
    """`repeats` rounds of every load in `loads`, interleaved, after one short warm-up round."""
    prompts = itertools.count()
    await settle(server, workers=len(SHARING_MODELS) + 1)  # the spare's boot is not a round's
    async with loopback_client(server.port) as client:
        await load_round(client, SHARING_MODELS, WARMUP_TOKENS, prompts)
        rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in loads}
        for i in range(repeats):
            for label, models in loads.items():
                before = cpu_sample(server.proc.pid)
                result = await load_round(client, models, args.tokens, prompts)
                result["others_percent"] = others_percent(before, cpu_sample(server.proc.pid))
                rounds[label].append(result)
                _say_round(label, i, result)
    return rounds


def measure_sharing(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Two different models (the embedded Q4_K_M and its Q8_0 requantization): each alone, then
    both at once, with the lease; then both at once without it."""
    first, second = SHARING_MODELS
    paths = {first: EMBEDDED_MODEL, second: str(q8_model(args.threads))}
    models = [model_table(m, **SHAPE, path=paths[m], preload=True) for m in SHARING_MODELS]
    loads = {f"{first} alone": (first,), f"{second} alone": (second,), "both busy": SHARING_MODELS}
    configs = [config_text(args.threads, models), config_text(args.threads, models, False)]
    with serving_config("sharing-lease", configs[0], tmp, args.port, SHARING_MODELS) as server:
        leased = asyncio.run(sharing_rounds(server, args, loads, REPEATS))
    # one round only: without the lease the two models' spinning threads can slow each other
    # down by an order of magnitude, so more rounds would only make the benchmark crawl
    with serving_config("sharing-no-lease", configs[1], tmp, args.port, SHARING_MODELS) as server:
        unleased = asyncio.run(sharing_rounds(server, args, {"both busy": SHARING_MODELS}, 1))
    return {
        "alone": {m: leased[f"{m} alone"] for m in SHARING_MODELS},
        "both": leased["both busy"],
        "both_no_lease": unleased["both busy"],
        "configs": configs,
    }


def _kept(both: dict[str, Any], alone: dict[str, dict[str, Any]]) -> float:
    """What two busy models together keep of the cores: the sum over the models of each one's
    tok/s while both run over its tok/s alone (1.0 = sharing costs nothing; models of different
    speeds count alike)."""
    return sum(both["per_model_tok_s"][m] / alone[m]["per_model_tok_s"][m] for m in alone)


def summarize_sharing(result: dict[str, Any]) -> dict[str, Any]:
    alone, both = result["alone"], result["both"]
    median_alone = {m: _median_round(runs, m) for m, runs in alone.items()}
    kept = [_kept(b, {m: alone[m][i] for m in alone}) for i, b in enumerate(both)]
    return {
        "alone_tok_s": {m: [r["per_model_tok_s"][m] for r in runs] for m, runs in alone.items()},
        "both_tok_s": {m: [r["per_model_tok_s"][m] for r in both] for m in alone},
        "kept": statistics.median(kept),
        "kept_runs": kept,
        "kept_no_lease": _kept(result["both_no_lease"][0], median_alone),
    }


def _median_round(rounds: Sequence[dict[str, Any]], model: str) -> dict[str, Any]:
    """The round of median tok/s for `model`."""
    ordered = sorted(rounds, key=lambda r: r["per_model_tok_s"][model])
    return ordered[len(ordered) // 2]


# -- 2. cold start ---------------------------------------------------------------------------


def run_cold_anchor(
    model_path: str, shape: dict[str, int], threads: int, prompt: str, t_submit: float
) -> dict[str, float]:
    """Raw llama.cpp load + context + prompt + first token; runs in a fresh spawned process."""
    t = {"called": time.perf_counter()}  # CLOCK_MONOTONIC: comparable across processes on Linux
    import_llama()
    t["imported"] = time.perf_counter()
    spec = ModelSpec(id="anchor", path=Path(model_path), **shape)  # the server's model table
    with raw_llama(spec, threads, marks=t) as raw:
        prompt_tokens, _ = raw.first_token(prompt)
        t["first"] = time.perf_counter()
    return {
        "spawn_s": t["called"] - t_submit,  # interpreter start + this module's imports
        "import_s": t["imported"] - t["called"],
        "model_load_s": t["model"] - t["start"],
        "context_s": t["context"] - t["model"],
        "prompt_first_token_s": t["first"] - t["context"],
        "total_s": t["first"] - t["start"],
        "prompt_tokens": prompt_tokens,
    }


def cold_anchor(model: Path, threads: int, prompt: str) -> dict[str, float]:
    return in_fresh_process(
        run_cold_anchor, str(model), SHAPE, threads, prompt, time.perf_counter()
    )


async def warm_api(client: httpx.AsyncClient) -> None:
    """Exercise the completion route once without loading anything (unknown model: 404)."""
    outcome = await complete(client, "no-such-model", "warm-up", 1)
    if outcome.status != 404:
        raise RuntimeError(f"warm-up expected 404, got {outcome.status}")


async def cold_rounds(
    server: RunningServer, args: argparse.Namespace, model: Path, drop: bool
) -> dict[str, Any]:
    """Anchor, then server, REPEATS times; with `drop`, each starts with the file's pages out
    of the page cache (as after a reboot), else in it (as after an unload)."""
    anchors: list[dict[str, float]] = []
    firsts: list[Streamed] = []
    settled: list[float] = []
    noise: list[float] = []
    cached: list[float] = []
    async with loopback_client(server.port) as client:
        await warm_api(client)
        for i in range(REPEATS):
            settled.append(await settle(server, workers=1))  # no model loaded: the spare
            prompt = prompt_text(20_000 + i)
            before = cpu_sample(server.proc.pid)
            cached.append(cached_share(model, drop))
            anchors.append(await asyncio.to_thread(cold_anchor, model, args.threads, prompt))
            cached.append(cached_share(model, drop))
            firsts.append(await complete(client, "cold", prompt, COLD_TOKENS))
            require_complete(firsts[-1:], COLD_TOKENS)
            noise.append(others_percent(before, cpu_sample(server.proc.pid)))
            raw, served = anchors[-1]["total_s"], firsts[-1].ttft
            console.print(
                f"cold: run {i + 1}: raw load + first token {raw * 1000:.0f} ms, "
                f"multiserve first token {served * 1000:.0f} ms; CPU not ours {noise[-1]:.0f}%"
            )
            await unload(client, "cold")
    return {
        "anchor": anchors,
        "multiserve_ttft_s": [o.ttft for o in firsts],
        "settle_s": settled,
        "others_percent": noise,
        "cached_share_at_start": cached,  # anchor, server, anchor, server...
    }


def measure_cold(args: argparse.Namespace, tmp: Path, model: Path, drop: bool) -> dict[str, Any]:
    config = config_text(args.threads, [model_table("cold", **SHAPE, preload=False)])
    with serving_config("cold", config, tmp, args.port) as server:
        return {"config": config, **asyncio.run(cold_rounds(server, args, model, drop))}


def summarize_cold(result: dict[str, Any]) -> dict[str, Any]:
    def runs(key: str) -> list[float]:
        return [a[key] for a in result["anchor"]]

    med = statistics.median
    raw, served = med(runs("total_s")), med(result["multiserve_ttft_s"])
    return {
        "raw_total_s": raw,
        "raw_import_s": med(runs("import_s")),
        "raw_spawn_s": med(runs("spawn_s")),
        "raw_model_load_s": med(runs("model_load_s")),
        "raw_context_s": med(runs("context_s")),
        "raw_prompt_first_token_s": med(runs("prompt_first_token_s")),
        "multiserve_ttft_s": served,
        "multiserve_vs_raw": served / raw,
        "multiserve_vs_raw_paired_runs": [
            ttft / anchor["total_s"]
            for ttft, anchor in zip(result["multiserve_ttft_s"], result["anchor"], strict=True)
        ],
    }


# -- 3. flood --------------------------------------------------------------------------------


async def flood_round(server: RunningServer, n: int) -> dict[str, Any]:
    """One full request first (the model is warm), then `n` at once, each on a connection
    opened beforehand with its bytes built beforehand (raw sockets: an HTTP library's own CPU
    per request, 60 times over in one event loop, would be charged to the server)."""
    async with loopback_client(server.port) as client:
        first = await complete(client, "flood", prompt_text(0), FLOOD_TOKENS)
        require_complete([first], FLOOD_TOKENS)
        requests = [
            request_bytes("POST", "/v1/completions", flood_body(prompt_text(30_000 + i)))
            for i in range(n)
        ]
        async with connections(server.port, n) as opened:
            replies = await asyncio.gather(*map(exchange, opened, requests))
        stats = (await client.get("/stats")).json()["models"]["flood"]["requests"]
    return {"replies": replies, "stats": stats}


def flood_body(prompt: str) -> dict[str, object]:
    return {
        "model": "flood",
        "prompt": prompt,
        "max_tokens": FLOOD_TOKENS,
        **EXACT_GREEDY,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def measure_flood(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    limits = {"n_parallel": FLOOD_SLOTS, "queue_limit": FLOOD_QUEUE_LIMIT}
    models = [model_table("flood", n_ctx=SHAPE["n_ctx"], **limits, preload=True)]
    n = FLOOD_FACTOR * (FLOOD_SLOTS + FLOOD_QUEUE_LIMIT)
    config = config_text(args.threads, models)
    with serving_config("flood", config, tmp, args.port, loaded=("flood",)) as server:
        return {"config": config, **asyncio.run(flood_round(server, n))}


def _is_refusal(reply: RawReply) -> bool:
    return (
        reply.status == 503
        and reply.error_code() == "queue_full"
        and "retry-after" in reply.headers
    )


def summarize_flood(result: dict[str, Any]) -> dict[str, Any]:
    replies: list[RawReply] = result["replies"]
    admitted = [r for r in replies if r.status == 200]
    refused = [r for r in replies if _is_refusal(r)]
    others = [r for r in replies if r.status != 200 and not _is_refusal(r)]
    incomplete = [
        f"{tokens} of {FLOOD_TOKENS} tokens"
        for r in admitted
        if (tokens := r.streamed_tokens()) != FLOOD_TOKENS
    ]
    latencies = [r.seconds for r in refused]
    max_s = max(latencies, default=0.0)
    return {
        "sent": len(replies),
        "capacity": FLOOD_SLOTS + FLOOD_QUEUE_LIMIT,
        "admitted": len(admitted),
        "admitted_complete": len(admitted) - len(incomplete),
        "incomplete": incomplete,
        "refused": len(refused),
        "refusal_max_s": max_s,
        "refusal_p99_s": float(np.percentile(latencies, 99)) if latencies else 0.0,
        "refusal_p50_s": float(np.percentile(latencies, 50)) if latencies else 0.0,
        "retry_after_values": sorted({r.headers["retry-after"] for r in refused}),
        "other_statuses": [
            f"{r.status} {r.error_code()} retry-after={r.headers.get('retry-after')}"
            for r in others
        ],
        "server_refused_count": result["stats"].get("refused"),
        "passed": not incomplete and not others and bool(refused) and max_s < TARGET_REFUSAL_S,
    }


# -- 4. rotation -----------------------------------------------------------------------------


async def _loop_client(
    client: httpx.AsyncClient, model: str, until: float, prompts: Iterator[int]
) -> list[Streamed]:
    outcomes = []
    while time.perf_counter() < until:
        prompt = prompt_text(next(prompts))
        outcomes.append(await complete(client, model, prompt, ROTATION_TOKENS))
    return outcomes


async def rotation_round(server: RunningServer) -> dict[str, Any]:
    """Concurrent traffic (one looping client per model), then one client cycling the models."""
    prompts = itertools.count(40_000)
    async with loopback_client(server.port) as client:

        async def loads() -> int:
            stats = (await client.get("/stats")).json()["models"]
            return sum(stats[m]["loads"] for m in ROTATION_MODELS)

        until = time.perf_counter() + ROTATION_SECONDS
        jobs = [_loop_client(client, m, until, prompts) for m in ROTATION_MODELS]
        concurrent = [o for outcomes in await asyncio.gather(*jobs) for o in outcomes]
        concurrent_loads = await loads()
        sequential = []
        for _ in range(ROTATION_CYCLES):
            for model in ROTATION_MODELS:
                prompt = prompt_text(next(prompts))
                sequential.append(await complete(client, model, prompt, ROTATION_TOKENS))
        sequential_loads = await loads() - concurrent_loads
    return {
        "concurrent": {"outcomes": concurrent, "loads": concurrent_loads},
        "sequential": {"outcomes": sequential, "loads": sequential_loads},
    }


def measure_rotation(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    models = [model_table(m, n_ctx=SHAPE["n_ctx"], n_parallel=2) for m in ROTATION_MODELS]
    results = {}
    for label, turn in ROTATION_TURNS.items():
        fields = {"max_loaded_models": 2, "model_turn": turn}
        config = config_text(args.threads, models, server_fields=fields)
        with serving_config(f"rotation-{turn:g}", config, tmp, args.port) as server:
            results[label] = {"config": config, **asyncio.run(rotation_round(server))}
    return results


def _traffic_summary(traffic: dict[str, Any]) -> dict[str, Any]:
    outcomes: list[Streamed] = traffic["outcomes"]
    problems = [p for o in outcomes if (p := o.problem(ROTATION_TOKENS)) is not None]
    latencies = [o.t_end - o.t_send for o in outcomes]
    return {
        "requests": len(outcomes),
        "failed": problems,
        "loads": traffic["loads"],
        "loads_per_request": traffic["loads"] / max(1, len(outcomes)),
        "served_per_model": {
            m: sum(o.model == m and o.status == 200 for o in outcomes) for m in ROTATION_MODELS
        },
        "latency_p50_s": statistics.median(latencies) if latencies else 0.0,
        "latency_max_s": max(latencies, default=0.0),
    }


def summarize_rotation(result: dict[str, Any]) -> dict[str, Any]:
    summary = {
        label: {kind: _traffic_summary(run[kind]) for kind in ("concurrent", "sequential")}
        for label, run in result.items()
    }
    failed = any(run[kind]["failed"] for run in summary.values() for kind in run)
    turns, none = summary["turns"]["concurrent"], summary["no turns"]["concurrent"]
    ratio = turns["loads_per_request"] / max(none["loads_per_request"], 1e-9)
    passed = not failed and min(turns["served_per_model"].values()) > 0
    return summary | {"turns_vs_none": ratio, "passed": passed and ratio <= TARGET_ROTATION_LOADS}


# -- report ----------------------------------------------------------------------------------


def _verdict(ok: bool, target: str, noisy: bool) -> tuple[str, str]:
    return target, verdict(ok, noisy)


def _paired_row(table: Table, label: str, ratios: Sequence[float]) -> None:
    """Ratios of the interleaved pairs: how much of a verdict is drift between rounds."""
    median = statistics.median(ratios)
    table.add_row(label, f"{median:.3f}", runs_text(ratios, fmt="{:.3f}"), "-", "-")


def _sharing_rows(table: Table, s: dict[str, Any], noisy: bool) -> None:
    n = STREAMS_PER_MODEL
    for model, runs in s["alone_tok_s"].items():
        label = f"{model} ({SHARING_NAMES[model]}) alone, {n} streams (tok/s)"
        table.add_row(label, f"{statistics.median(runs):.1f}", runs_text(runs), "-", "-")
    for model, runs in s["both_tok_s"].items():
        label = f"{model} while both are busy, {n}+{n} streams (tok/s)"
        table.add_row(label, f"{statistics.median(runs):.1f}", runs_text(runs), "-", "-")
    target = _verdict(s["kept"] >= TARGET_SHARING, f">= {TARGET_SHARING:g}", noisy)
    kept_label = "kept while both busy: sum of each model's share of its alone tok/s"
    table.add_row(kept_label, f"{s['kept']:.3f}", runs_text(s["kept_runs"], fmt="{:.3f}"), *target)
    table.add_row(
        "  same, share_cores=false (one round)", f"{s['kept_no_lease']:.3f}", "", "-", "-"
    )


def _cold_rows(
    table: Table, s: dict[str, Any], result: dict[str, Any], noisy: bool, cache: str
) -> None:
    ms = 1000.0
    anchor = result["anchor"]
    cached = result["cached_share_at_start"]
    table.add_row(f"cold start, model file {cache}", "", "", "", "")
    resident = runs_text(cached, 100.0, "{:.0f}")
    table.add_row("  file resident at each start (%)", "", resident, "-", "-")
    rows = [
        ("raw: interpreter start + module imports (ms, excluded)", "raw_spawn_s", "spawn_s"),
        ("raw: import llama_cpp (ms, excluded)", "raw_import_s", "import_s"),
        ("raw: model load (ms)", "raw_model_load_s", "model_load_s"),
        ("raw: context creation (ms)", "raw_context_s", "context_s"),
        ("raw: prompt + first token (ms)", "raw_prompt_first_token_s", "prompt_first_token_s"),
        ("raw: load + first token, total (ms)", "raw_total_s", "total_s"),
    ]
    for label, key, run_key in rows:
        runs = runs_text([a[run_key] for a in anchor], ms, "{:.0f}")
        table.add_row(label, f"{s[key] * ms:.0f}", runs, "-", "-")
    served = f"{s['multiserve_ttft_s'] * ms:.0f}"
    runs = runs_text(result["multiserve_ttft_s"], ms, "{:.0f}")
    table.add_row("multiserve: request -> first token, cold (ms)", served, runs, "-", "-")
    ratio = s["multiserve_vs_raw"]
    target = _verdict(ratio <= TARGET_COLD, f"<= {TARGET_COLD:g}", noisy)
    table.add_row("multiserve / raw", f"{ratio:.3f}", "", *target)
    _paired_row(table, "  same ratio, run by run", s["multiserve_vs_raw_paired_runs"])


def _flood_rows(table: Table, s: dict[str, Any], noisy: bool) -> None:
    ms = 1000.0
    capacity = f"capacity {s['capacity']}"
    table.add_row("requests sent at once", str(s["sent"]), capacity, "-", "-")
    complete = f"{s['admitted_complete']} complete, {FLOOD_TOKENS} tokens each"
    table.add_row("admitted (200)", str(s["admitted"]), complete, "all complete", "-")
    retry = "Retry-After " + ",".join(s["retry_after_values"] or ["-"])
    table.add_row("refused (503 queue_full)", str(s["refused"]), retry, "-", "-")
    others = "; ".join(s["other_statuses"])
    table.add_row("other statuses", str(len(s["other_statuses"])), others, "0", "-")
    table.add_row("refusal latency p50 (ms)", f"{s['refusal_p50_s'] * ms:.1f}", "", "-", "-")
    table.add_row("refusal latency p99 (ms)", f"{s['refusal_p99_s'] * ms:.1f}", "", "-", "-")
    target = _verdict(s["passed"], f"< {TARGET_REFUSAL_S * ms:g}, all complete", noisy)
    table.add_row("refusal latency max (ms)", f"{s['refusal_max_s'] * ms:.1f}", "", *target)


def _rotation_rows(table: Table, s: dict[str, Any], noisy: bool) -> None:
    for label, turn in ROTATION_TURNS.items():
        for kind, what in (("concurrent", "3 looping clients"), ("sequential", "1 client cycling")):
            t = s[label][kind]
            served = "/".join(str(n) for n in t["served_per_model"].values())
            runs = (
                f"{t['requests']} requests ({served}), {t['loads']} loads, "
                f"{len(t['failed'])} failed, p50 {t['latency_p50_s']:.1f} s, "
                f"max {t['latency_max_s']:.1f} s"
            )
            row = f"3 models, room for 2, model_turn {turn:g}: {what}, loads per request"
            table.add_row(row, f"{t['loads_per_request']:.2f}", runs, "-", "-")
    target = _verdict(s["passed"], f"<= {TARGET_ROTATION_LOADS:g}, none failed", noisy)
    ratio = f"{s['turns_vs_none']:.2f}"
    table.add_row("3 looping clients: loads per request, turns / no turns", ratio, "", *target)


def render_table(report: dict[str, Any]) -> Table:
    table = target_table(
        "multiserve fleet: sharing and cold start median of 3 rounds; flood one burst"
    )
    summary, noisy = report["summary"], report["noisy"]
    sections: list[Callable[[], None]] = []
    if "sharing" in summary:
        sections.append(lambda: _sharing_rows(table, summary["sharing"], noisy["sharing"]))
    for phase, cache in (("cold", "in the page cache"), ("cold_dropped", "dropped from it")):
        if phase in summary:
            result = report["results"][phase]
            sections.append(
                lambda p=phase, c=cache, r=result: _cold_rows(table, summary[p], r, noisy[p], c)
            )
    if "flood" in summary:
        sections.append(lambda: _flood_rows(table, summary["flood"], noisy["flood"]))
    if "rotation" in summary:
        sections.append(lambda: _rotation_rows(table, summary["rotation"], noisy["rotation"]))
    for i, add_rows in enumerate(sections):
        if i:
            table.add_section()
        add_rows()
    return table


def header_lines(report: dict[str, Any]) -> list[str]:
    """Command, machine, settings and how busy the machine was, one line each."""
    m, args = report["machine"], report["settings"]
    cores = f"{m['logical_cores']} logical / {m['physical_cores']} physical cores"
    per_phase = {
        phase: f"{' '.join(f'{x:.2f}' for x in report['loadavg'][phase])}, not ours "
        f"{noise['steal_percent']:.1f}% steal + {noise['others_percent']:.1f}% other processes"
        for phase, noise in report["cpu_interference"].items()
    }
    return [
        f"command: {report['command']}",
        f"machine: {m['machine']}, {m['cpu']}, {cores} ({m['usable_cores']} usable), "
        f"Python {m['python']}, llama-cpp-python {m['llama_cpp_python']}",
        f"model: {Path(report['model']).name} ({EMBEDDED_MODEL}); --threads {args['threads']}, "
        f"--tokens {args['tokens']}; model shape {SHAPE}",
        *(f"{phase}: load average before {text}" for phase, text in per_phase.items()),
    ]


def print_report(out: Console, report: dict[str, Any]) -> None:
    for line in header_lines(report):
        out.print(line, highlight=False)
    if any(report["noisy"].values()):
        out.print("[yellow]warning: the machine was busy with other work; these numbers are noisy")
    out.print(render_table(report))


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--threads", type=int, default=2, help="compute threads (default 2)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream, sharing (64)")
    parser.add_argument("--port", type=int, default=8094, help="server port on 127.0.0.1 (8094)")
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    parser.add_argument(
        "--only", default=",".join(PHASES), help=f"comma-separated phases ({','.join(PHASES)})"
    )
    add_no_fail(parser)
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    if not args.only or set(args.only) - set(PHASES):
        parser.error(f"--only takes phases from {','.join(PHASES)}; got {args.only or 'none'}")
    if args.tokens < 2 or args.threads < 1:
        parser.error("need --tokens >= 2 and --threads >= 1")
    return args


def run_phases(
    args: argparse.Namespace, tmp: Path, model: Path
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Run the chosen phases in order; their results, CPU interference and load averages."""
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "sharing": lambda: measure_sharing(args, tmp),
        "cold": lambda: measure_cold(args, tmp, model, drop=False),
        "cold_dropped": lambda: measure_cold(args, tmp, model, drop=True),
        "flood": lambda: measure_flood(args, tmp),
        "rotation": lambda: measure_rotation(args, tmp),
    }
    results: dict[str, Any] = {}
    noise: dict[str, Any] = {}
    loadavg: dict[str, Any] = {}
    for phase in (p for p in PHASES if p in args.only):
        loadavg[phase] = os.getloadavg()
        console.print(f"[bold]{phase}[/bold]: load average {loadavg[phase][0]:.2f}")
        before = cpu_sample()
        results[phase] = runners[phase]()
        noise[phase] = interference(before, cpu_sample())
    return results, noise, loadavg


SUMMARIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sharing": summarize_sharing,
    "cold": summarize_cold,
    "cold_dropped": summarize_cold,
    "flood": summarize_flood,
    "rotation": summarize_rotation,
}


def missed(summary: dict[str, Any]) -> list[str]:
    """The phases whose target was missed."""
    checks = {
        "sharing": lambda s: s["kept"] >= TARGET_SHARING,
        "cold": lambda s: s["multiserve_vs_raw"] <= TARGET_COLD,
        "cold_dropped": lambda s: s["multiserve_vs_raw"] <= TARGET_COLD,
        "flood": lambda s: s["passed"],
        "rotation": lambda s: s["passed"],
    }
    return [phase for phase, s in summary.items() if not checks[phase](s)]


def _jsonable(value: object) -> object:
    if isinstance(value, Streamed):  # the text left out: the report is about timing
        fields = {k: v for k, v in asdict(value).items() if k != "text"}
        return fields | {"response_s": value.response_s, "ttft_s": value.ttft}
    if isinstance(value, RawReply):  # likewise the body
        return {"status": value.status, "seconds": value.seconds, "headers": value.headers}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if port_taken(args.port):
        return 2
    model = default_model_path()  # assembles the embedded model on a first run
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        results, noise, loadavg = run_phases(args, Path(tmp), model)
    report = {
        "command": shlex.join(sys.orig_argv),
        "machine": machine_info(),
        "model": str(model),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"repeats": REPEATS, "shape": SHAPE, "streams_per_model": STREAMS_PER_MODEL},
        "loadavg": loadavg,
        "cpu_interference": noise,
        "noisy": {phase: is_noisy({phase: n}) for phase, n in noise.items()},
        "targets": {
            "sharing_kept_min": TARGET_SHARING,
            "cold_multiserve_vs_raw_max": TARGET_COLD,
            "flood_refusal_max_s": TARGET_REFUSAL_S,
            "rotation_turns_vs_none_loads_max": TARGET_ROTATION_LOADS,
        },
        "summary": {phase: SUMMARIES[phase](r) for phase, r in results.items()},
        "results": results,
    }
    print_report(out, report)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
        out.print(f"wrote {args.out}")
    return exit_status(missed(report["summary"]), args.no_fail)


if __name__ == "__main__":
    run_benchmark(main)
