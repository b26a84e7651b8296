"""Serving-core benchmark: the multiserve server against raw llama.cpp on the same GGUF and cores.

    .venv/bin/python benchmarks/serving_core.py [--threads 2] [--tokens 128] [--concurrency 8]
                                                [--port 8093] [--out results.json] [--no-fail]

Why it is built this way:

* The anchor runs in the same invocation. A raw llama.cpp decode loop (llama-cpp-python's
  low-level API, no server, no IPC, no HTTP) on the same model file, thread count and context
  settings as the server's worker is measured first, in a spawned process that exits before the
  server starts, so the two never compete for the cores and the anchor's memory and threads are
  gone when the server is measured.
* Ratios, not absolute times, are what the targets judge. Timings on shared CPU machines drift by
  tens of percent from one minute to the next; "the server reaches 95% of what llama.cpp itself
  does on this machine, right now" survives that noise, while "N tokens/s" does not.
* Every measurement (anchor and server) is repeated three times and the median is reported.
* Noise is measured, not only suffered: the CPU time that neither this benchmark nor its
  children used (other processes, hypervisor steal) is printed per phase, and PASS/MISS get a
  "?" when it exceeds 5%.
* Targets: the server's single stream and its N concurrent streams each reach 95% of raw
  llama.cpp doing the same work (1 sequence; a batch of N). "server N / server 1" is printed
  without a target: the server's single stream can beat raw llama.cpp's (it enables flash
  attention), which would make a fixed scaling target miss for a good reason. The exit status
  is 1 when a target is missed (`--no-fail` for exploration).

Server numbers come from streamed `/v1/completions` with `ignore_eos` and greedy sampling, so
every request produces exactly `--tokens` tokens. Single-stream decode speed is timed from the
first streamed token to the last ((completion_tokens - 1) / (t_last - t_first)), which excludes
prefill just like the anchor's decode loop. The concurrent aggregate is total completion tokens
over the wall time from sending the requests to the last one finishing, so it includes prefill
and TTFT and is slightly pessimistic against the anchor's pure decode steps.
Only loopback traffic: the server binds 127.0.0.1 and the client ignores proxy settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from multiserve.config import ModelSpec
from multiserve.fleet.manager import worker_config
from multiserve.models.default import DEFAULT_MODEL_ID, default_model_path

HOST = "127.0.0.1"
REPEATS = 3
WARMUP_REQUESTS = 2
WARMUP_TOKENS = 32
HEALTH_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 600.0
ANCHOR_N_BATCH = 512  # capacity of the anchors' llama_batch arrays
SERVER_CTX = 4096  # the server's shape, which the anchor's context copies exactly
SERVER_SLOTS = 8
NOISE_WARN_PERCENT = 5.0
TARGET_SINGLE_VS_RAW = 0.95
TARGET_CONCURRENT_VS_RAW = 0.95  # the server's 8 streams against raw llama.cpp's batch of 8
_TOPICS = (
    "a lighthouse keeper",
    "a clockmaker's apprentice",
    "a lost mountain village",
    "a ship made of glass",
    "the last library on earth",
    "a fox who learned to read",
    "a city under the sea",
    "an old train station",
    "a garden on the moon",
    "a forgotten radio signal",
    "a painter who could not see",
    "a bridge between two winters",
)

WIDTH = None if sys.stdout.isatty() else 120  # rich would wrap piped output at 80 columns
console = Console(stderr=True, width=WIDTH)


def prompt_text(i: int) -> str:
    """A distinct, similarly sized prompt for every request (no two share a prefix by accident)."""
    return f"Story {i}: a long tale about {_TOPICS[i % len(_TOPICS)]}. Once upon a time,"


# -- anchor: raw llama.cpp in a spawned process ---------------------------------------------------

_llama_log_callback: Any = None  # the ctypes callback must outlive every llama.cpp call


def _silence_llama(ll: ModuleType) -> None:
    global _llama_log_callback

    @ll.llama_log_callback
    def _drop(_level: int, _text: bytes, _user_data: ctypes.c_void_p) -> None:
        return None

    _llama_log_callback = _drop
    ll.llama_log_set(_drop, None)


def _tokenize(ll: ModuleType, vocab: Any, text: str) -> list[int]:
    data = text.encode()
    capacity = len(data) + 8
    buf = (ll.llama_token * capacity)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, capacity, True, False)
    if n < 0:
        raise RuntimeError(f"tokenize needs {-n} tokens, had room for {capacity}")
    return list(buf[:n])


def _fill(batch: Any, entries: Sequence[tuple[int, int, int, bool]]) -> None:
    """Write (token, pos, seq, logits) rows into a llama_batch that owns its C arrays."""
    if len(entries) > ANCHOR_N_BATCH:
        raise ValueError(f"{len(entries)} tokens do not fit a batch of {ANCHOR_N_BATCH}")
    for i, (token, pos, seq, logits) in enumerate(entries):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
    batch.n_tokens = len(entries)


def _decode(ll: ModuleType, ctx: Any, batch: Any) -> None:
    rc = ll.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")


def _argmax(ll: ModuleType, ctx: Any, batch_index: int, n_vocab: int) -> int:
    logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, batch_index), shape=(n_vocab,))
    return int(logits.argmax())


def _decode_rate(
    ll: ModuleType,
    ctx: Any,
    batch: Any,
    n_vocab: int,
    prompts: Sequence[Sequence[int]],
    steps: int,
) -> float:
    """Prefill `prompts` (one sequence each), then time `steps` greedy steps; aggregate tok/s."""
    ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
    entries: list[tuple[int, int, int, bool]] = []
    last_rows: list[int] = []
    for seq, prompt in enumerate(prompts):
        entries += [(tok, pos, seq, pos == len(prompt) - 1) for pos, tok in enumerate(prompt)]
        last_rows.append(len(entries) - 1)
    _fill(batch, entries)
    _decode(ll, ctx, batch)
    tokens = [_argmax(ll, ctx, row, n_vocab) for row in last_rows]
    positions = [len(p) for p in prompts]
    n = len(prompts)
    start = time.perf_counter()
    for _ in range(steps):
        _fill(batch, [(tokens[s], positions[s], s, True) for s in range(n)])
        _decode(ll, ctx, batch)
        tokens = [_argmax(ll, ctx, s, n_vocab) for s in range(n)]
        positions = [p + 1 for p in positions]
    return n * steps / (time.perf_counter() - start)


def run_anchor(model_path: str, threads: int, tokens: int, n_seq: int) -> dict[str, Any]:
    """Raw llama.cpp decode loops; runs in a spawned process (top level so it pickles)."""
    import llama_cpp as ll

    _silence_llama(ll)
    ll.llama_backend_init()
    model_params = ll.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model = ll.llama_model_load_from_file(model_path.encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    prompts = [_tokenize(ll, vocab, prompt_text(10_000 + i)) for i in range(n_seq)]

    # The very context the server's worker creates for the embedded model as `serve` runs it
    # (same code, same defaults), not a copy of its settings.
    from multiserve.engine.runtime import context_params  # imports llama.cpp: anchor side only

    spec = ModelSpec(id="anchor", path=Path(model_path), n_ctx=SERVER_CTX, n_parallel=SERVER_SLOTS)
    ctx = ll.llama_init_from_model(model, context_params(worker_config(spec, threads)))
    if not ctx:
        ll.llama_model_free(model)
        raise RuntimeError("llama.cpp could not create a context")
    batch = ll.llama_batch_init(ANCHOR_N_BATCH, 0, 1)  # referenced until every decode is done
    try:
        _decode_rate(ll, ctx, batch, n_vocab, prompts[:1], 8)  # warm-up: page in the weights
        _decode_rate(ll, ctx, batch, n_vocab, prompts, 8)
        single = [
            _decode_rate(ll, ctx, batch, n_vocab, prompts[:1], tokens) for _ in range(REPEATS)
        ]
        batched = [_decode_rate(ll, ctx, batch, n_vocab, prompts, tokens) for _ in range(REPEATS)]
    finally:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)
        ll.llama_backend_free()
    return {
        "single_tok_s": single,
        "batched_tok_s": batched,
        "prompt_tokens": [len(p) for p in prompts],
        "n_ctx": SERVER_CTX * SERVER_SLOTS,
    }


def measure_anchor(model: Path, threads: int, tokens: int, n_seq: int) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_anchor, str(model), threads, tokens, n_seq).result()


# -- the server -----------------------------------------------------------------------------------


def server_command(port: int, threads: int) -> list[str]:
    serve = ["serve", "--host", HOST, "--port", str(port), "--threads", str(threads)]
    serve += ["--ctx", str(SERVER_CTX), "--parallel", str(SERVER_SLOTS)]
    return [sys.executable, "-m", "multiserve", *serve]


def add_no_fail(parser: argparse.ArgumentParser) -> None:
    """Every benchmark exits 1 on a missed target, so `make bench` fails; this is for exploring."""
    parser.add_argument(
        "--no-fail", action="store_true", help="exit 0 even when a target is missed"
    )


def exit_status(missed: Sequence[str], no_fail: bool) -> int:
    """1 when a target was missed (said on the console), unless --no-fail."""
    if not missed:
        return 0
    note = " (--no-fail: exit status 0)" if no_fail else ""
    console.print(f"[red]missed the target: {', '.join(missed)}{note}")
    return 0 if no_fail else 1


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


@contextlib.contextmanager
def running_server(command: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start the server in its own session; always stop it and any worker it left behind."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.wait(timeout=5)
        with contextlib.suppress(psutil.Error):
            child.kill()


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def wait_loaded(client: httpx.AsyncClient, proc: subprocess.Popen[bytes], log: Path) -> float:
    """Poll GET /health until the default model is "loaded"; seconds waited."""
    start = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(httpx.TransportError, ValueError):
            response = await client.get("/health")
            if response.json().get("models", {}).get(DEFAULT_MODEL_ID) == "loaded":
                return time.perf_counter() - start
        if time.perf_counter() - start > HEALTH_TIMEOUT_S:
            raise TimeoutError(f"model not loaded after {HEALTH_TIMEOUT_S:.0f}s:\n{log_tail(log)}")
        await asyncio.sleep(0.25)


@dataclass
class StreamResult:
    completion_tokens: int
    t_start: float
    t_first: float
    t_last: float
    t_end: float

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_start

    @property
    def decode_tok_s(self) -> float:
        return (self.completion_tokens - 1) / (self.t_last - self.t_first)


async def stream_completion(client: httpx.AsyncClient, prompt: str, tokens: int) -> StreamResult:
    """One streamed greedy completion of exactly `tokens` tokens, timed per chunk."""
    body = {
        "model": DEFAULT_MODEL_ID,
        "prompt": prompt,
        "max_tokens": tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    t_first: float | None = None
    t_last = 0.0
    completion_tokens = 0
    t_start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        async for line in response.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices") or ()):
                t_first = now if t_first is None else t_first
                t_last = now
    t_end = time.perf_counter()
    if t_first is None or completion_tokens < 2:
        raise RuntimeError(f"stream produced {completion_tokens} tokens; usage chunk missing?")
    if completion_tokens != tokens:
        console.print(f"[yellow]warning: asked for {tokens} tokens, got {completion_tokens}")
    return StreamResult(completion_tokens, t_start, t_first, t_last, t_end)


async def concurrent_round(
    client: httpx.AsyncClient, prompts: Sequence[str], tokens: int
) -> dict[str, float]:
    """Start one stream per prompt together; aggregate tok/s over the wall time to the last end."""
    start = time.perf_counter()
    results = await asyncio.gather(*(stream_completion(client, p, tokens) for p in prompts))
    wall = max(r.t_end for r in results) - start
    total = sum(r.completion_tokens for r in results)
    ttfts = [r.ttft for r in results]
    return {
        "aggregate_tok_s": total / wall,
        "wall_s": wall,
        "completion_tokens": total,
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p99_s": float(np.percentile(ttfts, 99)),
    }


async def measure_server(
    proc: subprocess.Popen[bytes], log: Path, port: int, tokens: int, concurrency: int
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=5.0)
    async with httpx.AsyncClient(
        base_url=f"http://{HOST}:{port}", timeout=timeout, limits=limits, trust_env=False
    ) as client:
        load_s = await wait_loaded(client, proc, log)
        console.print(f"server: model loaded after {load_s:.1f}s; warming up")
        next_prompt = iter(range(1_000_000))
        for _ in range(WARMUP_REQUESTS):
            await stream_completion(client, prompt_text(next(next_prompt)), WARMUP_TOKENS)
        singles: list[StreamResult] = []
        for i in range(REPEATS):
            singles.append(await stream_completion(client, prompt_text(next(next_prompt)), tokens))
            console.print(f"server: 1 stream, run {i + 1}: {singles[-1].decode_tok_s:.1f} tok/s")
        rounds: list[dict[str, float]] = []
        for i in range(REPEATS):
            prompts = [prompt_text(next(next_prompt)) for _ in range(concurrency)]
            rounds.append(await concurrent_round(client, prompts, tokens))
            rate = rounds[-1]["aggregate_tok_s"]
            console.print(f"server: {concurrency} streams, run {i + 1}: {rate:.1f} tok/s")
    return {
        "load_s": load_s,
        "single_tok_s": [r.decode_tok_s for r in singles],
        "single_ttft_s": [r.ttft for r in singles],
        "concurrent_tok_s": [r["aggregate_tok_s"] for r in rounds],
        "concurrent_ttft_mean_s": [r["ttft_mean_s"] for r in rounds],
        "concurrent_ttft_p99_s": [r["ttft_p99_s"] for r in rounds],
        "concurrent_rounds": rounds,
    }


# -- report ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    keys = ("model name", "Model", "Hardware", "cpu model")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in keys and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class CpuSample:
    times: Any  # psutil.cpu_times(): the whole machine
    own_s: float  # CPU seconds of this process and every child it has reaped


def cpu_sample() -> CpuSample:
    t = os.times()
    return CpuSample(psutil.cpu_times(), t.user + t.system + t.children_user + t.children_system)


def _cpu_total(times: Any) -> float:
    guest = ("guest", "guest_nice")  # already counted in user and nice on Linux
    return sum(v for k, v in times._asdict().items() if k not in guest)


def interference(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """How much of the machine was not ours between two samples, in percent of all CPU time.

    `steal` is time the hypervisor gave other guests; `others` is CPU used by processes outside
    this benchmark's tree (anything but us, the anchor process, the server and its worker).
    """
    total = _cpu_total(after.times) - _cpu_total(before.times)
    if total <= 0:
        return {"steal_percent": 0.0, "others_percent": 0.0}

    def delta(name: str) -> float:
        return getattr(after.times, name, 0.0) - getattr(before.times, name, 0.0)

    steal = delta("steal")
    busy = total - delta("idle") - delta("iowait") - steal
    others = max(0.0, busy - (after.own_s - before.own_s))
    return {"steal_percent": 100.0 * steal / total, "others_percent": 100.0 * others / total}


def machine_info() -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
    }


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


def summarize(anchor: dict[str, Any], server: dict[str, Any]) -> Summary:
    med = statistics.median
    raw_single, raw_batched = med(anchor["single_tok_s"]), med(anchor["batched_tok_s"])
    single, concurrent = med(server["single_tok_s"]), med(server["concurrent_tok_s"])
    return Summary(
        raw_single=raw_single,
        raw_batched=raw_batched,
        server_single=single,
        server_concurrent=concurrent,
        ttft_single_s=med(server["single_ttft_s"]),
        ttft_concurrent_mean_s=med(server["concurrent_ttft_mean_s"]),
        ttft_concurrent_p99_s=med(server["concurrent_ttft_p99_s"]),
        server_single_vs_raw=single / raw_single,
        server_concurrent_vs_single=concurrent / single,
        server_concurrent_vs_raw_batched=concurrent / raw_batched,
        raw_batched_vs_single=raw_batched / raw_single,
    )


def _runs(values: Sequence[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    return "  ".join(fmt.format(v * scale) for v in values)


def _verdict(value: float, target: float | None, noisy: bool) -> tuple[str, str]:
    if target is None:
        return "-", "-"
    verdict = "[green]PASS" if value >= target else "[red]MISS"
    return f">= {target:g}", verdict + ("? (noisy)" if noisy else "")


def render_table(
    s: Summary, anchor: dict[str, Any], server: dict[str, Any], n: int, noisy: bool
) -> Table:
    table = Table(title="multiserve serving core vs raw llama.cpp (median of 3 runs each)")
    for column in ("measurement", "median", "runs", "target", "result"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    rates = [
        ("raw llama.cpp, 1 seq (tok/s)", s.raw_single, anchor["single_tok_s"]),
        (f"raw llama.cpp, {n} seq (tok/s)", s.raw_batched, anchor["batched_tok_s"]),
        ("server, 1 stream decode (tok/s)", s.server_single, server["single_tok_s"]),
        (f"server, {n} streams aggregate (tok/s)", s.server_concurrent, server["concurrent_tok_s"]),
    ]
    for label, value, values in rates:
        table.add_row(label, f"{value:.1f}", _runs(values), "-", "-")
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
        table.add_row(label, f"{value * ms:.0f}", _runs(values, ms, "{:.0f}"), "-", "-")
    table.add_section()
    ratios = [
        ("server 1 / raw 1", s.server_single_vs_raw, TARGET_SINGLE_VS_RAW),
        (f"server {n} / server 1", s.server_concurrent_vs_single, None),
        (f"server {n} / raw {n}", s.server_concurrent_vs_raw_batched, TARGET_CONCURRENT_VS_RAW),
        (f"raw {n} / raw 1 (reference)", s.raw_batched_vs_single, None),
    ]
    for label, value, target in ratios:
        table.add_row(label, f"{value:.3f}", "", *_verdict(value, target, noisy))
    return table


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


def measure_server_phase(args: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    """Run the server for the measurement only; show its log if anything goes wrong."""
    with tempfile.TemporaryDirectory(prefix="serving-core-") as tmp:
        log = Path(tmp) / "server.log"
        with running_server(command, log) as proc:
            try:
                return asyncio.run(
                    measure_server(proc, log, args.port, args.tokens, args.concurrency)
                )
            except Exception:
                console.print(f"[red]server log (last lines):[/red]\n{log_tail(log)}")
                raise


def is_noisy(noise: dict[str, dict[str, float]]) -> bool:
    return any(
        n["steal_percent"] + n["others_percent"] > NOISE_WARN_PERCENT for n in noise.values()
    )


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
    table = render_table(
        summary, report["anchor"], report["server"], args["concurrency"], report["noisy"]
    )
    out.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup on `kill`
    model = default_model_path()
    if port_in_use(args.port):
        console.print(f"[red]port {args.port} on {HOST} is already in use; pick another --port")
        return 2

    console.print(f"anchor: raw llama.cpp, {args.threads} threads, {model.name}")
    cpu_before = cpu_sample()
    anchor = measure_anchor(model, args.threads, args.tokens, args.concurrency)
    cpu_between = cpu_sample()
    command = server_command(args.port, args.threads)
    console.print(f"server: {shlex.join(command)}")
    server = measure_server_phase(args, command)
    noise = {
        "anchor": interference(cpu_before, cpu_between),
        "server": interference(cpu_between, cpu_sample()),
    }

    summary = summarize(anchor, server)
    report = {
        "command": shlex.join(sys.orig_argv),
        "server_command": command,
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
        },
        "anchor": anchor,
        "server": server,
    }
    out = Console(width=WIDTH)
    print_report(out, report, summary)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        out.print(f"wrote {args.out}")
    missed = [
        name
        for name, value, target in (
            ("server 1 / raw 1", summary.server_single_vs_raw, TARGET_SINGLE_VS_RAW),
            (
                "server 8 / raw 8",
                summary.server_concurrent_vs_raw_batched,
                TARGET_CONCURRENT_VS_RAW,
            ),
        )
        if value < target
    ]
    return exit_status(missed, args.no_fail)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the server and the anchor are already stopped by then
        console.print("[red]interrupted")
        sys.exit(130)
