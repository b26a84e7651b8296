"""The seed's day: the shipped config (Qwen loaded at start and pinned) under traffic that moves
between experts as users do.

Two users chat with the pinned expert all day (multi-turn under one shared system prompt, some
seconds of thought between turns). About every minute and a half a few users turn to another
expert for a short conversation of their own: the first four bursts go to the other four, in a
seeded order, then a weighted choice. Every request is recorded with whether it had to wait for
a load (its model, by /stats just before, not in memory or giving way); /stats is read twice a
second for the models in memory, and the machine's available memory with it. Evictions are each
model's loads but the last one still in memory: nobody unloads by hand, and the day must be
shorter than the config's `idle_ttl`.

A user stays within what a model's slots and queue hold, so any refusal is one that could have
waited: the target is none, and every admitted request complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import httpx
import psutil

from benchmarks.common.output import console
from benchmarks.common.sse import EXACT_GREEDY, Streamed, stream
from benchmarks.experts_day.text import answered, tokens

PINNED = "qwen"
PINNED_USERS, PINNED_TURNS, PINNED_TOKENS = 2, 5, 16
THINK_S = (4.0, 12.0)
BURST_MODELS = {"gemma3": 3, "aya_expanse_multilingual": 3, "mistral": 2, "phi4": 2}  # weights
BURST_USERS, BURST_TURNS, BURST_TOKENS = 2, 2, 12
BURST_THINK_S = (2.0, 6.0)
FIRST_BURST_S, BURST_GAP_S = 30.0, (60.0, 110.0)
LAST_BURST_BEFORE_END_S = 60.0
SYSTEM_TOKENS, USER_TOKENS = 100, 20
POLL_S = 0.5


@dataclass
class DayRequest:
    model: str
    user: str
    at_s: float  # sent, from the start of the day
    cold: bool  # its model was not loaded when it was sent
    reply: Streamed


@dataclass
class Watcher:
    """What /stats says, twice a second: the models in memory, and the machine's free memory."""

    client: httpx.AsyncClient
    timeline: list[tuple[float, tuple[str, ...]]] = field(default_factory=list)
    lowest_available: int = 2**62

    async def models(self) -> dict[str, dict]:
        return (await self.client.get("/stats")).json()["models"]

    async def cold(self, model: str) -> bool:
        """True when a request sent now must wait for a load (its model is not in memory, or
        is giving way to another)."""
        entry = (await self.models())[model]
        return entry["state"] != "loaded" or entry["giving_way"]

    async def poll(self, started: float) -> None:
        with contextlib.suppress(Exception):  # a missed sample is no reason to stop watching
            models = await self.models()
            loaded = tuple(sorted(m for m, e in models.items() if e["state"] == "loaded"))
            if not self.timeline or self.timeline[-1][1] != loaded:
                self.timeline.append((round(time.perf_counter() - started, 1), loaded))
        self.lowest_available = min(self.lowest_available, psutil.virtual_memory().available)

    async def run(self, started: float) -> None:
        while True:
            await self.poll(started)
            await asyncio.sleep(POLL_S)


@dataclass
class DayLog:
    seconds: float
    requests: list[DayRequest]
    evictions: dict[str, int]
    timeline: list[tuple[float, tuple[str, ...]]]
    lowest_available: int
    loads: dict[str, int]
    bursts: list[tuple[float, str]]


@dataclass(frozen=True)
class User:
    name: str
    model: str
    system: str
    tokens: int
    think_s: tuple[float, float]


class Day:
    def __init__(self, client: httpx.AsyncClient, seconds: float, seed: int) -> None:
        self.client = client
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.watcher = Watcher(client)
        self.requests: list[DayRequest] = []
        self.started = 0.0

    def bursts(self) -> list[tuple[float, str]]:
        """(start, expert) of every burst: the four others first in a shuffled order, then
        weighted choices, until a minute before the end."""
        order = list(BURST_MODELS)
        self.rng.shuffle(order)
        at, plan = FIRST_BURST_S, []
        while at < self.seconds - LAST_BURST_BEFORE_END_S:
            model = order.pop(0) if order else self._weighted()
            plan.append((round(at, 1), model))
            at += self.rng.uniform(*BURST_GAP_S)
        return plan

    def _weighted(self) -> str:
        return self.rng.choices(list(BURST_MODELS), weights=list(BURST_MODELS.values()))[0]

    async def conversation(self, user: User, turns: int, rng: random.Random) -> None:
        """Up to `turns` turns, each sending the whole history; stops at the end of the day."""
        messages = [{"role": "system", "content": user.system}]
        for _ in range(turns):
            if time.perf_counter() - self.started > self.seconds:
                return
            messages.append({"role": "user", "content": tokens(rng, USER_TOKENS)})
            body = {"model": user.model, "messages": messages, "max_tokens": user.tokens}
            cold = await self.watcher.cold(user.model)
            at = time.perf_counter() - self.started
            reply = await self.send({**body, **EXACT_GREEDY})
            self.requests.append(DayRequest(user.model, user.name, at, cold, reply))
            if reply.problem(user.tokens) is None:
                messages.append(answered(rng, reply.completion_tokens))
            else:  # asked again next turn, as a user whose message was refused would
                messages.pop()
                console.print(f"[yellow]{user.name} -> {user.model}: {reply.problem()}")
            await asyncio.sleep(rng.uniform(*user.think_s))

    async def send(self, body: dict) -> Streamed:
        """The streamed chat; a connection that breaks is a request not served, not the end
        of the day."""
        sent = time.perf_counter()
        try:
            return await stream(self.client, "/v1/chat/completions", body)
        except httpx.HTTPError as exc:
            failed = Streamed(body["model"], body["max_tokens"], True, 0, sent, time.perf_counter())
            failed.stream_error = f"{type(exc).__name__}: {exc}"
            return failed

    async def pinned_user(self, i: int, system: str) -> None:
        rng = random.Random(f"pinned-{i}")
        user = User(f"pinned-{i}", PINNED, system, PINNED_TOKENS, THINK_S)
        await asyncio.sleep(i * THINK_S[0])  # the two do not start in the same second
        while time.perf_counter() - self.started < self.seconds:
            await self.conversation(user, PINNED_TURNS, rng)

    async def burst(self, at: float, model: str, n: int) -> None:
        await asyncio.sleep(at)
        console.print(f"day {at:.0f} s: {BURST_USERS} users turn to {model}")
        system = tokens(random.Random(model), SYSTEM_TOKENS)  # one per expert, shared by its users
        users = [
            User(f"burst-{n}.{j}", model, system, BURST_TOKENS, BURST_THINK_S)
            for j in range(BURST_USERS)
        ]
        await asyncio.gather(
            *(self.conversation(u, BURST_TURNS, random.Random(u.name)) for u in users)
        )

    async def run(self) -> DayLog:
        plan = self.bursts()
        self.started = time.perf_counter()
        watching = asyncio.create_task(self.watcher.run(self.started))
        system = tokens(random.Random(PINNED), SYSTEM_TOKENS)
        try:
            await asyncio.gather(
                *(self.pinned_user(i, system) for i in range(PINNED_USERS)),
                *(self.burst(at, model, n) for n, (at, model) in enumerate(plan)),
            )
        finally:
            watching.cancel()
        models = await self.watcher.models()
        # nobody unloads by hand and the day is shorter than any idle_ttl, so every load but a
        # model's last one still in memory ended in an eviction
        evictions = {
            m: e["loads"] - (e["state"] in ("loaded", "loading")) for m, e in models.items()
        }
        return DayLog(
            seconds=time.perf_counter() - self.started,
            requests=self.requests,
            evictions=evictions,
            timeline=self.watcher.timeline,
            lowest_available=self.watcher.lowest_available,
            loads={model: entry["loads"] for model, entry in models.items()},
            bursts=plan,
        )
