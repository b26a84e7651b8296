"""Speed on real traffic: multi-turn chats, a shared system prompt, sampled decoding, saturation.

    .venv/bin/python -m benchmarks.real_traffic [--threads 2] [--only multi_turn,shared,...]
                                                [--servers multiserve,llama-server]
                                                [--out-dir benchmarks/results] [--no-fail]

Runs multiserve and llama.cpp's own `llama-server` one after the other (never both at once) on the
default model with the same threads, slots (`-np 8`, llama-server's default prompt reuse on) and
requests, and prints every figure beside the anchor with their ratio. llama-server is built from
the llama.cpp sources llama-cpp-python vendors, with our CMake flags (scripts/build-llama-server.sh;
several minutes once, cached). Targets, all within one invocation (timings here drift by tens of
percent between minutes, so only ratios mean anything):

* multi-turn chat, 6 turns under a ~1,500-token system prompt: 6th-turn TTFT <= 0.05x the 1st with
  one chat, <= 0.15x with four chats side by side;
* eight users sending one system prompt at once, first turn: mean TTFT <= 0.35x the same run with
  `cache_prompt: false`;
* sampled decoding (temperature 1, the full distribution) >= 0.95x greedy tokens/s, at 8 streams
  and at 1;
* 200 streams at once against 8 slots and a queue of 32 (three bursts after a warm-up one): every
  refusal within 250 ms, /health within 100 ms while they run, every admitted stream complete
  (multiserve only: llama-server queues without bound). The burst comes from raw sockets, so the
  load generator costs far less per request than the server;
* every row at least llama-server's speed ("vs llama-server" >= 1: its time over ours, or our
  tokens/s over its).

Equal work: the completions behind the tokens/s rows ask for an exact count (`ignore_eos`); each
server's completion tokens are checked against it request by request, and a server that did less
work is named in the "work" column: its speed is not counted as a win (a row multiserve loses only
to a llama-server that did less work is NOT COUNTED, not MISS; one where multiserve did less work
is a MISS). Chat turns end where the model ends its answer, so their length is not checked.

The process exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.table import Table

from benchmarks.common import sse
from benchmarks.common.equal_work import Work, judged, work_notes
from benchmarks.common.output import out
from benchmarks.common.raw_http import raw_request
from benchmarks.common.servers import (
    ServerCommand,
    build_llama_server,
    llama_server_command,
    multiserve_command,
    port_taken,
    run_benchmark,
    serving,
)
from benchmarks.common.sse import Streamed, loopback_client
from benchmarks.common.verdict import add_no_fail, exit_status, verdict
from multiserve.models.default import DEFAULT_MODEL_ID, default_model_path

SLOTS = 8
CTX_PER_SLOT = 4096
TURNS = 6
ANSWER_TOKENS = 48
SYSTEM_SENTENCES = 52  # about 1,500 tokens on Gemma 3's tokenizer
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 900.0
SCENARIOS = ("multi_turn", "shared", "sampled", "saturation")

TARGET_ONE_CHAT = 0.05
TARGET_FOUR_CHATS = 0.15
TARGET_SHARED = 0.35
TARGET_SAMPLED = 0.95
TARGET_REFUSAL_S = 0.25
TARGET_HEALTH_S = 0.10
TARGET_VS_PEER = 1.0


# -- servers ------------------------------------------------------------------------------------


def multiserve_server(port: int, threads: int) -> ServerCommand:
    return ServerCommand("multiserve", multiserve_command(port, "--threads", str(threads)))


def llama_server(binary: Path, port: int, threads: int) -> ServerCommand:
    options = ["-tb", str(threads), "--no-warmup"]
    model, n_ctx = default_model_path(), CTX_PER_SLOT * SLOTS
    command = llama_server_command(binary, model, port, threads, n_ctx, SLOTS, *options)
    return ServerCommand("llama-server", command)


def client_of(port: int) -> httpx.AsyncClient:
    # no keep-alive: llama-server's HTTP library closes idle connections after a few seconds, and
    # a request sent on one it is closing fails for nothing; a new loopback connection costs ~0.1 ms
    return loopback_client(port, 256, keepalive=False, timeout_s=REQUEST_TIMEOUT_S, connect_s=10.0)


# -- requests -----------------------------------------------------------------------------------


async def chat(
    client: httpx.AsyncClient, messages: list[dict], tokens: int, **extra: object
) -> Streamed:
    body = {"model": DEFAULT_MODEL_ID, "messages": messages, "max_tokens": tokens}
    body = {"temperature": 0, **body, **extra}
    return (await sse.stream(client, "/v1/chat/completions", body)).raise_for_failure()


async def complete(
    client: httpx.AsyncClient, prompt: str, tokens: int, **extra: object
) -> Streamed:
    """Exactly `tokens` tokens asked for (`ignore_eos`); sampling as `extra` says."""
    reply = await sse.complete(client, DEFAULT_MODEL_ID, prompt, tokens, **extra)
    return reply.raise_for_failure()


def system_prompt(seed: int) -> str:
    """A ~1,500-token operating manual, different for every seed (so no run finds it cached)."""
    rng = random.Random(seed)
    topics = ["refunds", "shipping", "warranty", "privacy", "returns", "billing", "security"]
    rules = [
        f"Rule {i}: when a customer asks about {rng.choice(topics)}, check section "
        f"{rng.randrange(1, 99)}.{rng.randrange(1, 20)} of the handbook and answer in two lines."
        for i in range(SYSTEM_SENTENCES)
    ]
    return f"You are support assistant #{uuid.uuid4().hex[:8]}. " + " ".join(rules)


def question(chat_id: int, turn: int) -> str:
    return f"Customer {chat_id}, question {turn}: what does rule {7 * turn + chat_id} say?"


async def conversation(client: httpx.AsyncClient, system: str, chat_id: int) -> list[Streamed]:
    """TURNS turns of one chat: every turn sends the whole history, as chat clients do."""
    messages = [{"role": "system", "content": system}]
    replies = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": question(chat_id, turn)})
        reply = await chat(client, messages, ANSWER_TOKENS)
        messages.append({"role": "assistant", "content": reply.text})
        replies.append(reply)
    return replies


# -- scenarios ----------------------------------------------------------------------------------


@dataclass
class Results:
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    work: dict[str, Work] = field(default_factory=dict)  # figures whose requests owe their tokens

    def count(self, figure: str, replies: list[Streamed]) -> None:
        """Count `replies` (sent with ignore_eos) as work behind `figure`."""
        work = self.work.setdefault(figure, Work())
        for reply in replies:
            work.add(reply.completion_tokens, reply.asked)


async def multi_turn(client: httpx.AsyncClient, results: Results, repeats: int = 3) -> None:
    """One chat (three times, each under its own system prompt; medians), then four side by side
    under one shared system prompt."""
    ones = [await conversation(client, system_prompt(10 + i), chat_id=0) for i in range(repeats)]
    results.figures["1 chat: turn 1 TTFT s"] = statistics.median(c[0].ttft for c in ones)
    results.figures[f"1 chat: turn {TURNS} TTFT s"] = statistics.median(c[-1].ttft for c in ones)
    system = system_prompt(2)
    four = await asyncio.gather(*(conversation(client, system, chat_id=i) for i in range(4)))
    results.figures["4 chats: turn 1 mean TTFT s"] = statistics.fmean(c[0].ttft for c in four)
    results.figures[f"4 chats: turn {TURNS} mean TTFT s"] = statistics.fmean(
        c[-1].ttft for c in four
    )


async def shared(client: httpx.AsyncClient, results: Results) -> None:
    async def eight(system: str, **extra: object) -> float:
        replies = await asyncio.gather(
            *(
                chat(
                    client,
                    [
                        {"role": "system", "content": system},
                        {"role": "user", "content": question(i, 0)},
                    ],
                    16,
                    **extra,
                )
                for i in range(8)
            )
        )
        return statistics.fmean(r.ttft for r in replies)

    results.figures["8 users, one system prompt: mean TTFT s"] = await eight(system_prompt(3))
    results.figures["same, cache_prompt false: mean TTFT s"] = await eight(
        system_prompt(4), cache_prompt=False
    )


SAMPLED = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
GREEDY = {"temperature": 0.0}


async def sampled(client: httpx.AsyncClient, results: Results, repeats: int = 5) -> None:
    """Greedy and sampled rounds interleaved, so drift hits both alike; medians reported. One
    stream's rate swings by 10% from request to request here, hence five rounds of 256 tokens."""
    rates: dict[str, list[float]] = {}
    topics = ["a harbour town", "a clock tower", "a mountain pass", "a winter market"]
    for round_ in range(repeats):
        for name, params in (("greedy", GREEDY), ("sampled", SAMPLED)):
            prompt = f"Chapter {round_}: a long story about {topics[round_ % 4]}."
            one = await complete(client, prompt, 256, seed=round_, **params)
            rates.setdefault(f"{name} 1 stream", []).append(one.decode_tok_s)
            results.count(f"{name} 1 stream: tok/s", [one])
            start = time.perf_counter()
            replies = await asyncio.gather(
                *(
                    complete(client, f"{prompt} Part {i}.", 128, seed=i, **params)
                    for i in range(SLOTS)
                )
            )
            wall = time.perf_counter() - start
            rates.setdefault(f"{name} 8 streams", []).append(
                sum(r.completion_tokens for r in replies) / wall
            )
            results.count(f"{name} 8 streams: tok/s", replies)
    for name, values in rates.items():
        results.figures[f"{name}: tok/s"] = statistics.median(values)


async def saturation(client: httpx.AsyncClient, results: Results, bursts: int = 3) -> None:
    """200 streams at once against 8 slots and a queue of 32: one burst to warm the refusal
    path up, then `bursts` measured ones; the worst of them is reported."""
    port = client.base_url.port
    refusals: list[float] = []
    health: list[float] = []
    completed = failed = 0
    running = True

    async def one(i: int) -> None:
        nonlocal completed, failed
        body = {
            "model": DEFAULT_MODEL_ID,
            "prompt": f"Item {i}: once upon a time",
            "max_tokens": 32,
            "ignore_eos": True,
            "stream": True,
        }
        reply = await raw_request(port, "POST", "/v1/completions", body)
        if reply.status == 503:
            refusals.append(reply.seconds)
        elif reply.status == 200 and b"data: [DONE]" in reply.body:
            completed += 1
        else:
            failed += 1

    async def probe() -> None:
        while running:
            health.append((await raw_request(port, "GET", "/health")).seconds)
            await asyncio.sleep(0.05)

    await asyncio.gather(*(one(i) for i in range(200)))  # warm-up
    refusals.clear()
    completed = failed = 0
    prober = asyncio.create_task(probe())
    for _ in range(bursts):
        await asyncio.gather(*(one(i) for i in range(200)))
    running = False
    await prober
    results.figures["saturation: refusals, 3 bursts"] = len(refusals)
    results.figures["saturation: slowest refusal s"] = max(refusals, default=0.0)
    results.figures["saturation: median refusal s"] = statistics.median(refusals or [0.0])
    results.figures["saturation: slowest /health s"] = max(health, default=0.0)
    results.figures["saturation: admitted and completed, 3 bursts"] = completed
    results.figures["saturation: admitted and failed"] = failed


RUNNERS: dict[str, Callable[[httpx.AsyncClient, Results], object]] = {
    "multi_turn": multi_turn,
    "shared": shared,
    "sampled": sampled,
    "saturation": saturation,
}


async def measure(name: str, port: int, only: list[str]) -> Results:
    results = Results()
    async with client_of(port) as client:
        await complete(client, "Warm-up: one, two,", 8, temperature=0)  # loads the model
        for scenario in only:
            if scenario == "saturation" and name != "multiserve":
                continue
            out.print(f"[bold]{name}[/]: {scenario}")
            await RUNNERS[scenario](client, results)
    return results


# -- verdicts -----------------------------------------------------------------------------------


@dataclass
class Check:
    label: str
    value: float
    target: float
    higher_is_better: bool
    ours: Work | None = None  # the work behind a figure compared with llama-server's
    peer: Work | None = None

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    @property
    def ok(self) -> bool | None:
        """met, weighed by work: None when lost only to a llama-server that did less work."""
        return judged(self.met, self.ours, self.peer)


# (label, numerator figure, denominator figure, target, higher is better)
RATIOS = (
    (f"1 chat: turn {TURNS} / turn 1 TTFT", f"1 chat: turn {TURNS} TTFT s",
     "1 chat: turn 1 TTFT s", TARGET_ONE_CHAT, False),
    (f"4 chats: turn {TURNS} / turn 1 TTFT", f"4 chats: turn {TURNS} mean TTFT s",
     "4 chats: turn 1 mean TTFT s", TARGET_FOUR_CHATS, False),
    ("shared prompt: reuse / no reuse TTFT", "8 users, one system prompt: mean TTFT s",
     "same, cache_prompt false: mean TTFT s", TARGET_SHARED, False),
    ("sampled / greedy tok/s, 1 stream", "sampled 1 stream: tok/s", "greedy 1 stream: tok/s",
     TARGET_SAMPLED, True),
    ("sampled / greedy tok/s, 8 streams", "sampled 8 streams: tok/s", "greedy 8 streams: tok/s",
     TARGET_SAMPLED, True),
)  # fmt: skip
# (label, figure, target): lower is better
LIMITS = (
    ("slowest refusal s", "saturation: slowest refusal s", TARGET_REFUSAL_S),
    ("slowest /health s", "saturation: slowest /health s", TARGET_HEALTH_S),
    ("admitted streams failed", "saturation: admitted and failed", 0),
)


def checks(ours: Results, peer: Results | None) -> list[Check]:
    mine = ours.figures
    found = [
        Check(label, mine[top] / mine[bottom], target, higher)
        for label, top, bottom, target, higher in RATIOS
        if top in mine and bottom in mine
    ]
    found += [
        Check(label, mine[name], target, False) for label, name, target in LIMITS if name in mine
    ]
    for name, value in mine.items():
        if peer is None or name not in peer.figures or name.startswith(("saturation", "same,")):
            continue
        theirs = peer.figures[name]
        faster = theirs / value if name.endswith(" s") else value / theirs
        found.append(
            Check(
                f"vs llama-server: {name}",
                faster,
                TARGET_VS_PEER,
                True,
                ours.work.get(name),
                peer.work.get(name),
            )
        )
    return found


def report(ours: Results, peer: Results | None) -> list[Check]:
    table = Table(title="real traffic: multiserve and llama-server, default model")
    for column in ("figure", "multiserve", "llama-server", "vs llama-server", "work"):
        table.add_column(column, justify="left" if column in ("figure", "work") else "right")
    names = list(dict.fromkeys([*ours.figures, *(peer.figures if peer else {})]))
    for name in names:
        value = ours.figures.get(name)
        theirs = peer.figures.get(name) if peer else None
        vs = ""
        if theirs and value and not name.startswith("saturation"):
            vs = f"{(theirs / value if name.endswith(' s') else value / theirs):.2f}x"
        shown = ["" if v is None else f"{v:.3f}" for v in (value, theirs)]
        works = {
            "multiserve": ours.work.get(name),
            "llama-server": peer.work.get(name) if peer else None,
        }
        table.add_row(name, *shown, vs, work_notes(works))
    out.print(table)
    verdicts = checks(ours, peer)
    summary = Table(title="targets")
    for column in ("check", "value", "target", "verdict"):
        summary.add_column(column, justify="left" if column == "check" else "right")
    for check in verdicts:
        sign = ">=" if check.higher_is_better else "<="
        cell = verdict(check.ok)
        summary.add_row(check.label, f"{check.value:.3f}", f"{sign} {check.target}", cell)
    out.print(summary)
    return verdicts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.real_traffic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument(
        "--servers", default="multiserve,llama-server", help="multiserve and/or llama-server"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    add_no_fail(parser)
    args = parser.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if port_taken(args.port):
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    servers: list[ServerCommand] = []
    if "multiserve" in args.servers:
        servers.append(multiserve_server(args.port, args.threads))
    if "llama-server" in args.servers:
        servers.append(llama_server(build_llama_server(), args.port, args.threads))
    measured: dict[str, Results] = {}
    for server in servers:
        log = args.out_dir / f"real-traffic-{server.name}.log"
        with serving(server.name, server.command, args.port, log, timeout_s=READY_TIMEOUT_S):
            measured[server.name] = asyncio.run(measure(server.name, args.port, args.only))
    ours, peer = measured.get("multiserve", Results()), measured.get("llama-server")
    verdicts = report(ours, peer)
    results = args.out_dir / "real-traffic.json"
    results.write_text(
        json.dumps(
            {
                "threads": args.threads,
                "figures": {name: r.figures for name, r in measured.items()},
                "work": {
                    name: {figure: asdict(w) for figure, w in r.work.items()}
                    for name, r in measured.items()
                },
                "checks": [asdict(c) | {"ok": c.ok} for c in verdicts],
            },
            indent=2,
        )
    )
    out.print(f"results: {results}")
    return exit_status([c.label for c in verdicts if c.ok is False], args.no_fail)


if __name__ == "__main__":
    run_benchmark(main)
