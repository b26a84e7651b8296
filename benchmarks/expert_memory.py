"""The memory estimate against reality, for the five experts at their real sizes.

    .venv/bin/python -m benchmarks.expert_memory [NAME ...] [--kv f16,q8_0] [--threads 2]
                                                 [--port 8096] [--out-dir benchmarks/results]

Each expert is the shape-true file of benchmarks/shapes (written first if this machine has not
got it: 26 GB for the five), served by multiserve alone with the shape examples/experts.toml
gives it (context, slots), with its KV cache at each of `--kv`. Measured: the worker's RSS once
loaded, and after a full-size step on it (one request whose 256-token prompt is a whole
`step_tokens` step, so the compute buffers have been used), against the estimate multiserve
budgets with (weights + KV + compute + host prompt cache + overhead; /stats).

Weights are read into the worker (not mapped: see docs/operations.md); llama.cpp clears the KV
cache when it creates the context, so the whole cache is resident from the load on. After a full
step, everything the estimate counts is resident but the host prompt cache, which fills only as
prompts are evicted from slots. Targets (the budget's promise, docs/operations.md): RSS after a
step at most the estimate, and at least 85% of it without the host cache (an estimate far above
reality wastes the budget). Exit status 1 on a miss.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.table import Table

from benchmarks.common.multiserve_config import config_text, serving_config
from benchmarks.common.output import console, out
from benchmarks.common.servers import port_taken, run_benchmark
from benchmarks.common.verdict import add_no_fail, exit_status, verdict
from benchmarks.shapes.gguf_file import cached_model
from benchmarks.shapes.specs import EXPERTS
from multiserve.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
STEP_TOKENS = 256
LOAD_TIMEOUT_S = 900.0  # a 9 GB file read from disk on a slow volume
LOWEST_SHARE = 0.85
GIB = 2**30


@dataclass(frozen=True)
class Measured:
    model: str
    kv: str
    n_ctx: int
    n_parallel: int
    estimate: dict[str, int]
    rss_loaded: int
    rss_stepped: int
    load_s: float
    step_s: float

    @property
    def held(self) -> int:
        """What the estimate says is resident after a step: all of it but the host cache."""
        return self.estimate["total"] - self.estimate["host_cache"]


def _memory(http: httpx.Client, model: str) -> dict:
    return http.get("/stats").json()["models"][model]["memory_bytes"]


def measure(name: str, kv: str, threads: int, port: int, directory: Path) -> Measured:
    spec = next(m for m in load_settings(ROOT / "examples" / "experts.toml").models if m.id == name)
    path = cached_model(EXPERTS[name])
    table = {
        "id": name,
        "path": str(path),
        "n_ctx": spec.n_ctx,
        "n_parallel": spec.n_parallel,
        "step_tokens": STEP_TOKENS,
        "kv_cache_type": kv,
        "preload": True,
    }
    # the whole machine's memory: a model the default 80% cannot hold would never load
    fields = {"load_timeout": LOAD_TIMEOUT_S, "memory_budget": "100%"}
    config = config_text(threads, [table], server_fields=fields)
    with (
        serving_config(
            f"{name}-{kv}", config, directory, port, loaded=[name], timeout_s=LOAD_TIMEOUT_S
        ) as server,
        httpx.Client(base_url=server.url, timeout=LOAD_TIMEOUT_S, trust_env=False) as http,
    ):
        loaded = _memory(http, name)
        prompt = list(range(300, 300 + STEP_TOKENS))  # ids every expert's vocabulary has
        started = time.perf_counter()
        body = {"model": name, "prompt": prompt, "max_tokens": 1, "cache_prompt": False}
        reply = http.post("/v1/completions", json=body)
        reply.raise_for_status()
        step_s = time.perf_counter() - started
        stepped = _memory(http, name)
    return Measured(
        name,
        kv,
        spec.n_ctx,
        spec.n_parallel,
        loaded["estimate"],
        loaded["rss"],
        stepped["rss"],
        server.ready_s,
        step_s,
    )


def report(rows: Sequence[Measured]) -> list[str]:
    table = Table(title="memory: multiserve's estimate against the worker's RSS (GiB)")
    columns = ("expert", "KV", "slots x ctx", "weights", "KV cache", "compute", "host cache")
    columns += ("estimate", "RSS loaded", "RSS after a step", "share", "result")
    for column in columns:
        table.add_column(column, justify="left" if column in ("expert", "KV") else "right")
    missed = []
    for row in rows:
        e = row.estimate
        share = row.rss_stepped / row.held
        ok = row.rss_stepped <= e["total"] and share >= LOWEST_SHARE
        if not ok:
            missed.append(f"{row.model} {row.kv}: RSS {row.rss_stepped / GIB:.2f} GiB")
        table.add_row(
            row.model,
            row.kv,
            f"{row.n_parallel} x {row.n_ctx}",
            *(f"{e[part] / GIB:.2f}" for part in ("weights", "kv_cache", "compute", "host_cache")),
            f"{e['total'] / GIB:.2f}",
            f"{row.rss_loaded / GIB:.2f}",
            f"{row.rss_stepped / GIB:.2f}",
            f"{share:.1%}",
            verdict(ok),
        )
    out.print(table)
    out.print(
        "share: RSS after a step over the estimate without its host cache (target "
        f">= {LOWEST_SHARE:.0%}, and RSS <= the whole estimate). Load and step times (s): "
        + ", ".join(f"{r.model} {r.kv} {r.load_s:.0f}/{r.step_s:.0f}" for r in rows)
    )
    return missed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(EXPERTS))
    parser.add_argument("--kv", default="f16,q8_0", help="KV cache types, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8096)
    parser.add_argument("--out-dir", type=Path, help="keep configs and logs here")
    add_no_fail(parser)
    args = parser.parse_args(argv)
    if port_taken(args.port):
        return 2
    directory = args.out_dir or Path(tempfile.mkdtemp(prefix="expert-memory-"))
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.names or EXPERTS:
        for kv in args.kv.split(","):
            console.print(f"{name}, KV {kv}: loading")
            rows.append(measure(name, kv, args.threads, args.port, directory))
    return exit_status(report(rows), args.no_fail)


if __name__ == "__main__":
    run_benchmark(main)
