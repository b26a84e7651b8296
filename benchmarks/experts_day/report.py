"""The replay's tables, its targets, and the memory-bandwidth ceiling each expert is held to.

Decoding one token of one stream reads every weight once, except the token embedding, of which
only the token's own row is read (unless it is tied to the output, which reads all of it). So the
ceiling is `read bandwidth / weight bytes read per token`; the KV cache read per token is left out
(under 1% of the weights at these prompts' lengths).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence

from rich.table import Table

from benchmarks.common.output import out
from benchmarks.common.verdict import verdict
from benchmarks.experts_day.day import DayLog, DayRequest
from benchmarks.experts_day.one_by_one import ExpertRun
from benchmarks.experts_day.seed import shape_of
from benchmarks.shapes.gguf_file import data_bytes
from benchmarks.shapes.specs import ModelShape, tensor_plan
from multiserve.bench.metrics import percentile

TARGET_COLD = 1.5  # server's cold TTFT (page cache) / raw llama.cpp load + first token
TARGET_DECODE = 0.85  # server's 1-stream decode / raw llama.cpp's
TARGET_REUSE = 0.5  # next turn's TTFT with prefix reuse / the same turn read again
GB = 1e9


def bytes_per_token(shape: ModelShape) -> int:
    """Weight bytes one decoded token reads (see the module's docstring)."""
    plan = tensor_plan(shape)
    return sum(
        data_bytes(p) for p in plan if p.name != "token_embd.weight" or shape.tied_embeddings
    )


def _table(title: str, columns: Sequence[str]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "expert" else "right")
    return table


def speed_table(runs: Sequence[ExpertRun]) -> list[str]:
    table = _table(
        "each expert alone: tokens/s (ceiling: memory read GB/s / GB read per token; raw: "
        "llama.cpp on the worker's context; prompt: reading a chat turn again)",
        (
            "expert",
            "GB/token",
            "GB/s",
            "ceiling",
            "raw",
            "/ceiling",
            "1 stream",
            "/ceiling",
            "vs raw",
            "result",
            "4 streams",
            "x 1 stream",
            "prompt",
        ),
    )
    missed = []
    for run in runs:
        per_token = bytes_per_token(shape_of(run.model))
        ceiling = run.bandwidth / per_token
        ratio = run.decode_1_tok_s / run.raw_decode_tok_s
        if ratio < TARGET_DECODE:
            missed.append(f"{run.model} decode {ratio:.2f}x raw")
        table.add_row(
            run.model,
            f"{per_token / GB:.2f}",
            f"{run.bandwidth / GB:.1f}",
            f"{ceiling:.2f}",
            f"{run.raw_decode_tok_s:.2f}",
            f"{run.raw_decode_tok_s / ceiling:.0%}",
            f"{run.decode_1_tok_s:.2f}",
            f"{run.decode_1_tok_s / ceiling:.0%}",
            f"{ratio:.2f}",
            verdict(ratio >= TARGET_DECODE),
            f"{run.decode_4_tok_s:.2f}",
            f"{run.decode_4_tok_s / run.decode_1_tok_s:.2f}",
            f"{run.prompt_tok_s:.1f}",
        )
    out.print(table)
    return missed


def latency_table(runs: Sequence[ExpertRun]) -> list[str]:
    table = _table(
        "each expert alone: seconds to first token of a cold model (the file's share in the "
        "page cache before) and of a chat's next turn",
        (
            "expert",
            "cold: disk",
            "page cache",
            "raw",
            "raw load",
            "vs raw",
            "result",
            "turn tokens",
            "cached",
            "reuse",
            "read again",
            "ratio",
            "result ",
        ),
    )
    missed = []
    for run in runs:
        cold = run.ttft_cold_warm_s / run.raw_cold_s
        reuse = run.ttft_turn_reuse_s / run.ttft_turn_no_reuse_s
        if cold > TARGET_COLD:
            missed.append(f"{run.model} cold start {cold:.2f}x raw")
        if reuse > TARGET_REUSE:
            missed.append(f"{run.model} next turn {reuse:.2f}x without reuse")
        table.add_row(
            run.model,
            f"{run.ttft_cold_dropped_s:.1f} ({run.cached_before_dropped:.0%})",
            f"{run.ttft_cold_warm_s:.1f} ({run.cached_before_warm:.0%})",
            f"{run.raw_cold_s:.1f}",
            f"{run.raw_load_s:.1f}",
            f"{cold:.2f}",
            verdict(cold <= TARGET_COLD),
            str(run.turn_prompt_tokens),
            str(run.turn_cached_tokens),
            f"{run.ttft_turn_reuse_s:.1f}",
            f"{run.ttft_turn_no_reuse_s:.1f}",
            f"{reuse:.2f}",
            verdict(reuse <= TARGET_REUSE),
        )
    out.print(table)
    out.print(
        f"targets: cold start from the page cache <= {TARGET_COLD}x raw llama.cpp (load, the "
        f"worker's context, prompt, first token); next turn with reuse <= {TARGET_REUSE}x the "
        f"same turn read again; 1-stream decode >= {TARGET_DECODE}x raw llama.cpp's."
    )
    return missed


def _seconds(values: Sequence[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{statistics.median(ordered):.1f} / {ordered[-1]:.1f}"


def _refusals(requests: Sequence[DayRequest]) -> str:
    codes = Counter(
        r.reply.code or (f"HTTP {r.reply.status}" if r.reply.status else "connection broken")
        for r in requests
        if r.reply.status != 200
    )
    return ", ".join(f"{n} {code}" for code, n in codes.items()) or "0"


def day_table(log: DayLog) -> list[str]:
    table = _table(
        f"the seed's day: {log.seconds / 60:.1f} minutes, bursts "
        + ", ".join(f"{model} at {at:.0f} s" for at, model in log.bursts),
        (
            "expert",
            "requests",
            "complete",
            "refused",
            "loads",
            "evictions",
            "cold TTFT p50 / max",
            "warm TTFT p50 / p95",
            "tok/s per stream p50",
            "prompt cached",
        ),
    )
    missed = []
    for model in sorted({r.model for r in log.requests}):
        mine = [r for r in log.requests if r.model == model]
        done = [r for r in mine if r.reply.problem(r.reply.asked) is None]
        warm = sorted(r.reply.ttft for r in done if not r.cold)
        speeds = [r.reply.decode_tok_s for r in done if r.reply.completion_tokens > 1]
        prompt = sum(r.reply.prompt_tokens for r in done)
        cached = sum(r.reply.cached_tokens or 0 for r in done)
        if len(done) < len(mine):
            missed.append(f"{model}: {len(mine) - len(done)} of {len(mine)} not served")
        table.add_row(
            model,
            str(len(mine)),
            str(len(done)),
            _refusals(mine),
            str(log.loads.get(model, 0)),
            str(log.evictions.get(model, 0)),
            _seconds([r.reply.ttft for r in done if r.cold]),
            f"{percentile(warm, 50):.1f} / {percentile(warm, 95):.1f}" if warm else "-",
            f"{statistics.median(speeds):.2f}" if speeds else "-",
            f"{cached / prompt:.0%}" if prompt else "-",
        )
    out.print(table)
    out.print(
        f"every request complete, none refused: {verdict(not missed)}; lowest available memory "
        f"{log.lowest_available / 2**30:.1f} GiB; in memory over the day: "
        + "; ".join(f"{at:.0f} s {'+'.join(models) or 'none'}" for at, models in log.timeline)
    )
    return missed
