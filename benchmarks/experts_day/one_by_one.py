"""Each expert alone on the seed's server: cold loads, decode speed, and a long chat's next turn.

For each expert, with no other model loaded (as after a restart, or a quiet hour):

1. its file's pages dropped from the page cache, one request: time to first token of a cold
   model read from disk;
2. loaded, settled: the machine's memory read bandwidth (benchmarks/common/bandwidth.py: the
   ceiling of one stream's decoding, measured next to it as it drifts with the neighbours' load),
   then tokens/s of one stream (median of three runs) and of four at once (exact counts, greedy);
3. a chat with ~500 tokens of history: its next turn's TTFT with the server's prefix reuse and
   with `cache_prompt: false` (the whole history read again, as a server without reuse does);
4. unloaded, then the anchor in a fresh process: raw llama.cpp loading the file (now in the page
   cache), creating the worker's very context, reading the same prompt and decoding single
   tokens; then the server's cold request again, with the file in the page cache.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass

import httpx

from benchmarks.common.bandwidth import read_bandwidth
from benchmarks.common.llama_anchor import import_llama, in_fresh_process, raw_llama
from benchmarks.common.output import console
from benchmarks.common.page_cache import cached_share
from benchmarks.common.server_control import settle, unload, unload_all
from benchmarks.common.servers import RunningServer
from benchmarks.common.sse import (
    EXACT_GREEDY,
    Streamed,
    complete,
    decode_rate,
    require_complete,
    stream,
)
from benchmarks.experts_day.text import answered, history, tokens
from multiserve.config import ModelSpec

COLD_TOKENS = 4
DECODE_TOKENS = 17  # 16 intervals between tokens, timed from the first to the last
ONE_STREAM_RUNS = 3  # the median counts: one run of a few seconds is at the mercy of a neighbour
RAW_DECODE_TOKENS = 48  # the anchor's, as many as the server's three runs
STREAMS = 4
PROMPT_TOKENS = 16
TURN_TOKENS = 8
SYSTEM_TOKENS, EXCHANGES, USER_TOKENS, ANSWER_TOKENS = 60, 2, 25, 50  # ~500 with the template


@dataclass
class ExpertRun:
    model: str
    bandwidth: float  # bytes/s this machine read just before the decode runs
    ttft_cold_dropped_s: float
    cached_before_dropped: float  # the file's share in the page cache before that request
    ttft_cold_warm_s: float
    cached_before_warm: float
    raw_cold_s: float  # anchor: load + context + prompt + first token
    raw_load_s: float
    raw_decode_tok_s: float
    decode_1_tok_s: float
    decode_4_tok_s: float
    turn_prompt_tokens: int
    turn_cached_tokens: int
    ttft_turn_reuse_s: float
    ttft_turn_no_reuse_s: float

    @property
    def prompt_tok_s(self) -> float:
        """Prompt reading speed: the whole turn read again, over its time to first token."""
        return self.turn_prompt_tokens / self.ttft_turn_no_reuse_s


def run_anchor(spec: ModelSpec, threads: int, prompt: str, n_tokens: int) -> dict[str, float]:
    """Raw llama.cpp on the worker's context for `spec`: cold load to first token, then
    `n_tokens` single-token decodes fed back greedily. Runs in a fresh spawned process."""
    import_llama()
    marks: dict[str, float] = {}
    with raw_llama(spec, threads, marks=marks) as raw:
        read, token = raw.first_token(prompt)
        first = time.perf_counter()
        for pos in range(read, read + n_tokens):
            raw.decode([(token, pos, 0, True)])
            token = raw.argmax(0)
        decoded = time.perf_counter()
    return {
        "cold_s": first - marks["start"],
        "load_s": marks["model"] - marks["start"],
        "decode_tok_s": n_tokens / (decoded - first),
    }


async def _streams(client: httpx.AsyncClient, model: str, rng: random.Random, n: int) -> float:
    """Decode tokens/s of `n` streams sent at once (`decode_rate`)."""
    jobs = [complete(client, model, tokens(rng, PROMPT_TOKENS), DECODE_TOKENS) for _ in range(n)]
    replies = await asyncio.gather(*jobs)
    require_complete(replies, DECODE_TOKENS)
    return decode_rate(replies)


async def _turn(
    client: httpx.AsyncClient, model: str, messages: list[dict[str, str]], **extra: object
) -> Streamed:
    body = {"model": model, "messages": messages, "max_tokens": TURN_TOKENS, **EXACT_GREEDY}
    reply = await stream(client, "/v1/chat/completions", {**body, **extra})
    require_complete([reply], TURN_TOKENS)
    return reply


async def _next_turn(
    client: httpx.AsyncClient, model: str, rng: random.Random
) -> tuple[Streamed, Streamed]:
    """A chat's next turn with prefix reuse, and the same turn read from scratch."""
    messages = history(rng, SYSTEM_TOKENS, EXCHANGES, USER_TOKENS, ANSWER_TOKENS)
    messages.append({"role": "user", "content": tokens(rng, USER_TOKENS)})
    answer = await _turn(client, model, messages)
    messages += [
        answered(rng, answer.completion_tokens),
        {"role": "user", "content": tokens(rng, USER_TOKENS)},
    ]
    reused = await _turn(client, model, messages)
    again = await _turn(client, model, messages, cache_prompt=False)
    return reused, again


async def _cold(
    client: httpx.AsyncClient, spec: ModelSpec, prompt: str, drop: bool
) -> tuple[float, float]:
    """(TTFT of a request to the unloaded model, its file's page-cache share just before)."""
    cached = cached_share(spec.path, drop)
    reply = await complete(client, spec.id, prompt, COLD_TOKENS)
    require_complete([reply], COLD_TOKENS)
    return reply.ttft, cached


async def measure_expert(
    server: RunningServer, client: httpx.AsyncClient, spec: ModelSpec, threads: int
) -> ExpertRun:
    rng = random.Random(spec.id)
    prompt = tokens(rng, PROMPT_TOKENS)
    await unload_all(client)
    await settle(server, workers=1)
    ttft_dropped, cached_dropped = await _cold(client, spec, prompt, drop=True)
    console.print(f"{spec.id}: cold, from disk: first token after {ttft_dropped:.1f} s")
    await settle(server, workers=2)
    bandwidth = await asyncio.to_thread(read_bandwidth, threads)
    one = statistics.median(
        [await _streams(client, spec.id, rng, 1) for _ in range(ONE_STREAM_RUNS)]
    )
    four = await _streams(client, spec.id, rng, STREAMS)
    console.print(f"{spec.id}: {one:.2f} tok/s at 1 stream, {four:.2f} at {STREAMS}")
    reused, again = await _next_turn(client, spec.id, rng)
    console.print(
        f"{spec.id}: next chat turn ({again.prompt_tokens} tokens): first token after "
        f"{reused.ttft:.1f} s with reuse, {again.ttft:.1f} s without"
    )
    await unload(client, spec.id)
    await settle(server, workers=1)
    anchor = await asyncio.to_thread(
        in_fresh_process, run_anchor, spec, threads, prompt, RAW_DECODE_TOKENS
    )
    ttft_warm, cached_warm = await _cold(client, spec, prompt, drop=False)
    console.print(
        f"{spec.id}: cold, from the page cache: first token after {ttft_warm:.1f} s "
        f"(raw llama.cpp {anchor['cold_s']:.1f} s); raw decode {anchor['decode_tok_s']:.2f} tok/s"
    )
    return ExpertRun(
        model=spec.id,
        bandwidth=bandwidth,
        ttft_cold_dropped_s=ttft_dropped,
        cached_before_dropped=cached_dropped,
        ttft_cold_warm_s=ttft_warm,
        cached_before_warm=cached_warm,
        raw_cold_s=anchor["cold_s"],
        raw_load_s=anchor["load_s"],
        raw_decode_tok_s=anchor["decode_tok_s"],
        decode_1_tok_s=one,
        decode_4_tok_s=four,
        turn_prompt_tokens=again.prompt_tokens,
        turn_cached_tokens=reused.cached_tokens or 0,
        ttft_turn_reuse_s=reused.ttft,
        ttft_turn_no_reuse_s=again.ttft,
    )
