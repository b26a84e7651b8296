"""Fleet races: loads, unloads, TTL expiry, crashes, budgets and back-off meeting each other.

A "slow" model is the tiny one with a context of 1M tokens per slot: llama.cpp clears its KV
cache (256 MiB a slot) while loading, which takes one to two seconds here, long enough to act
during a load. Most tests share one server, each with a model and a model file of its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import RunningServer, run_server
from test_fleet import (
    LONG,
    ROOM_FOR_ONE,
    Stream,
    _complete,
    _config,
    _model,
    _states,
    _stats,
    _wait_for,
    models,  # noqa: F401 (a fixture, read by `files` below)
)
from tiny_gguf import write_tiny_model

# a context of a million cells takes seconds to create; mapped, so the worker loading it is the
# one that has its file mapped (workers read files in by default)
SLOW = {"n_ctx": 1 << 20, "n_parallel": 1, "mmap": True}
GREEDY = {"prompt": "the cat", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def files(request: pytest.FixtureRequest) -> Path:
    """test_fleet's model files (a, b and c, truncated.gguf, alien.gguf) in a folder of ours."""
    return request.getfixturevalue("models")


@pytest.fixture(scope="module")
def fleet(files: Path) -> Iterator[RunningServer]:
    """One server with default settings. Each test has its own model, and the slow ones their
    own file: the worker that has a file mapped is that model's."""
    for name in ("unload", "manual", "kill", "m"):
        shutil.copyfile(files / "a.gguf", files / f"{name}.gguf")
    write_tiny_model(files / "wide.gguf", seed=1, n_embd=128)
    body = _model("slow-unload", "unload", **SLOW) + _model("slow-manual", "manual", **SLOW)
    body += _model("slow-kill", "kill", **{**SLOW, "n_parallel": 2})  # twice as slow
    body += _model("crash", "a", preload=True) + _model("ttl", "a", idle_ttl=0.5)
    body += _model("alien") + _model("m") + _model("wide")
    with run_server(["--config", str(_config(files, body))], files) as server:
        yield server


def _loading_worker(server: RunningServer, model_file: Path) -> psutil.Process | None:
    """The server's worker process that has `model_file` mapped."""
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if any(m.path == str(model_file) for m in child.memory_maps()):
                return child
        except psutil.Error:
            continue
    return None


def _text(http: httpx.Client, model: str) -> str:
    reply = _complete(http, model, **GREEDY)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def _in_thread(replies: dict, key: str, call: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=lambda: replies.update({key: call()}), daemon=True)
    thread.start()
    return thread


def _error(reply: httpx.Response) -> tuple[int, str, str]:
    error = reply.json()["error"]
    return reply.status_code, error["code"], error["message"]


def _refused_at_once(http: httpx.Client, model: str) -> bool:
    """Whether a new request is refused at once with 503 model_unavailable and Retry-After (one
    admitted instead would wait for the load; the client gives up, which frees its place)."""
    try:
        reply = http.post("/v1/completions", json={"model": model, **GREEDY}, timeout=0.5)
    except httpx.TimeoutException:
        return False
    return _error(reply)[:2] == (503, "model_unavailable") and "Retry-After" in reply.headers


def _three_at_once(server: RunningServer, model: str) -> list[httpx.Response]:
    async def three() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            body = {"model": model, **GREEDY}
            return await asyncio.gather(
                *(client.post("/v1/completions", json=body) for _ in range(3))
            )

    return asyncio.run(three())


# -- unload during a load ---------------------------------------------------------------------


def test_unload_during_a_request_triggered_load_is_refused_or_waits(
    fleet: RunningServer, files: Path
) -> None:
    """The load's request is in the system: a plain unload is refused (409); one with
    ?wait=true refuses new requests, lets the request finish, then unloads."""
    with fleet.http() as http:
        replies: dict[str, httpx.Response] = {}
        first = _in_thread(replies, "first", lambda: _complete(http, "slow-unload", **GREEDY))
        _wait_for(lambda: _states(http)["slow-unload"] == "loading")

        busy = http.post("/v1/models/slow-unload/unload")
        assert (busy.status_code, busy.json()["error"]["code"]) == (409, "model_busy")
        unload = _in_thread(
            replies, "unload", lambda: http.post("/v1/models/slow-unload/unload?wait=true")
        )
        _wait_for(lambda: _refused_at_once(http, "slow-unload"))  # while it waits to unload

        first.join(30)
        unload.join(30)
        assert replies["first"].status_code == 200, replies["first"].text
        assert replies["unload"].status_code == 200
        assert replies["unload"].json()["state"] == "unloaded"
        assert _states(http)["slow-unload"] == "unloaded"
        assert _stats(http, "slow-unload")["worker_pid"] is None
        assert _loading_worker(fleet, files / "unload.gguf") is None
        assert _text(http, "slow-unload")  # and it loads again on demand
        assert _stats(http, "slow-unload")["loads"] == 2


def test_unload_during_a_manual_load_is_not_lost(fleet: RunningServer) -> None:
    with fleet.http() as http:
        replies: dict[str, httpx.Response] = {}
        load = _in_thread(replies, "load", lambda: http.post("/v1/models/slow-manual/load"))
        _wait_for(lambda: _states(http)["slow-manual"] == "loading")
        unload = http.post("/v1/models/slow-manual/unload")
        load.join(30)
        final = _states(http)["slow-manual"]
        if unload.status_code == 200:  # it said the model is unloaded: so it must stay
            assert unload.json()["state"] == "unloaded"
            assert final == "unloaded", f"the unload answered 'unloaded'; the model is {final}"
            assert _stats(http, "slow-manual")["worker_pid"] is None
        else:  # or it refused, and the load went on
            assert unload.status_code == 409, unload.text
            assert final == "loaded"


# -- idle TTL ---------------------------------------------------------------------------------


def test_requests_arriving_as_the_idle_ttl_expires_are_all_served(fleet: RunningServer) -> None:
    """A request just as the TTL unloads the model starts a fresh load; one in flight across
    TTL checks keeps the model; requests spaced around the TTL never fail."""
    with fleet.http() as http:
        reference = _text(http, "ttl")
        _wait_for(lambda: _states(http)["ttl"] == "unloaded", timeout=5)
        assert _text(http, "ttl") == reference  # at the moment it was found unloaded
        loads = _stats(http, "ttl")["loads"]
        assert loads == 2

        stream = Stream(fleet.url, {"model": "ttl", **LONG, "max_tokens": 1000})
        stream.finish()  # about two seconds of decoding: a TTL check found the model busy
        assert stream.status == 200 and stream.lines[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in stream.lines[-2]

        for pause in (0.4, 0.8, 1.6):  # before, around and after the TTL, at any check's phase
            time.sleep(pause)
            assert _text(http, "ttl") == reference
        assert _stats(http, "ttl")["requests"]["failed"] == 0
        assert _stats(http, "ttl")["loads"] > loads  # the TTL did unload it in between


# -- crashes ----------------------------------------------------------------------------------


def test_worker_killed_while_loading_fails_its_waiters_once_then_reloads(
    fleet: RunningServer, files: Path
) -> None:
    with fleet.http() as http:
        replies: dict[str, list[httpx.Response]] = {}
        waiters = _in_thread(replies, "three", lambda: _three_at_once(fleet, "slow-kill"))
        _wait_for(lambda: _stats(http, "slow-kill")["requests"]["in_system"] == 3)
        deadline = time.monotonic() + 10
        while (worker := _loading_worker(fleet, files / "kill.gguf")) is None:
            assert time.monotonic() < deadline, "no worker is loading the model"
            time.sleep(0.02)
        assert _states(http)["slow-kill"] == "loading"
        worker.send_signal(signal.SIGKILL)
        waiters.join(30)

        for reply in replies["three"]:  # one load failed once: the same answer for all
            status, code, message = _error(reply)
            assert (status, code) == (503, "model_unavailable"), reply.text
            assert "exited while loading" in message
            assert reply.headers["Retry-After"] == "1"
        assert _states(http)["slow-kill"] == "failed"
        time.sleep(1.0)  # as Retry-After said
        assert _text(http, "slow-kill")
        assert _states(http)["slow-kill"] == "loaded"
        assert _stats(http, "slow-kill")["loads"] == 1


def test_worker_killed_during_a_non_stream_request(fleet: RunningServer) -> None:
    """A non-streamed request whose worker dies gets 503 model_crashed with Retry-After; after
    that many seconds the next request loads the model again and gets the same answer."""
    with fleet.http() as http:
        reference = _text(http, "crash")
        replies: dict[str, httpx.Response] = {}
        long = _in_thread(
            replies, "long", lambda: _complete(http, "crash", max_tokens=3000, ignore_eos=True)
        )
        _wait_for(lambda: _stats(http, "crash")["requests"]["running"] == 1)
        time.sleep(0.2)  # decoding
        os.kill(_stats(http, "crash")["worker_pid"], signal.SIGKILL)
        long.join(30)

        crashed = replies["long"]
        assert _error(crashed)[:2] == (503, "model_crashed"), crashed.text
        retry_after = int(crashed.headers["Retry-After"])
        assert retry_after >= 1
        assert _states(http)["crash"] == "failed"
        time.sleep(retry_after)
        assert _text(http, "crash") == reference
        assert _states(http)["crash"] == "loaded" and _stats(http, "crash")["loads"] == 2


# -- failure back-off -------------------------------------------------------------------------


def test_retry_after_doubles_with_each_failed_load(fleet: RunningServer) -> None:
    """A file llama.cpp refuses: 1 s, then 2, then 4 between load attempts. Concurrent
    requests share one attempt (one failure, not three), and requests during the back-off are
    refused without another attempt."""
    with fleet.http() as http:
        for reply in _three_at_once(fleet, "alien"):
            status, code, message = _error(reply)
            assert (status, code) == (503, "model_unavailable"), reply.text
            assert "failed to load" in message
            assert reply.headers["Retry-After"] == "1"
        during = _complete(http, "alien")
        assert "next load attempt in 1s" in _error(during)[2]
        assert during.headers["Retry-After"] == "1"

        seen = []
        for wait in (1, 2):
            time.sleep(wait + 0.2)
            reply = _complete(http, "alien")
            assert _error(reply)[:2] == (503, "model_unavailable")
            assert "failed to load" in _error(reply)[2]  # a new attempt, not the back-off
            seen.append(int(reply.headers["Retry-After"]))
        assert seen == [2, 4]


# -- the file changes -------------------------------------------------------------------------


def test_a_gguf_replaced_between_loads_is_the_one_loaded_next(
    fleet: RunningServer, files: Path
) -> None:
    """The file is swapped (a new inode, as a deploy does) while the model is unloaded: the
    next load reads the new file, and the memory estimate is the new file's."""
    with fleet.http() as http:
        before = _text(http, "m")
        weights_before = _stats(http, "m")["memory_bytes"]["estimate"]["weights"]
        expected = _text(http, "wide")
        assert expected != before  # the two files answer differently

        assert http.post("/v1/models/m/unload").json()["state"] == "unloaded"
        shutil.copyfile(files / "wide.gguf", files / "m.gguf.new")
        os.replace(files / "m.gguf.new", files / "m.gguf")

        assert _text(http, "m") == expected
        assert _stats(http, "m")["loads"] == 2
        assert _stats(http, "m")["memory_bytes"]["estimate"]["weights"] > weights_before


# -- memory budget ----------------------------------------------------------------------------


class BudgetWatch:
    """Polls /stats in the background: what was reserved, and which models held memory."""

    def __init__(self, url: str) -> None:
        self.looks: list[tuple[int, int, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            while not self._stop.is_set():
                stats = http.get("/stats").json()
                holding = [
                    model
                    for model, entry in stats["models"].items()
                    if entry["state"] in ("loading", "loaded")
                ]
                memory = stats["memory"]
                self.looks.append((memory["reserved"], memory["budget"], holding))
                time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize(
    "model_turn",
    [0, 15],
    ids=["the-busy-model-gives-way-after-its-turn", "the-idle-model-is-evicted"],
)
def test_two_cold_models_under_a_budget_for_one_are_served_in_turn(
    files: Path, model_turn: int
) -> None:
    """Requests for two cold models at once, with room for one: both are served, one model
    after the other, and the budget is never exceeded."""
    settings = f"threads = 1\n{ROOM_FOR_ONE}model_turn = {model_turn}\n"
    config = _config(files, _model("a") + _model("b"), settings)
    with run_server(["--config", str(config)], files) as server, server.http() as http:
        finished: dict[str, list[float]] = {"a": [], "b": []}

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

                async def one(model: str) -> httpx.Response:
                    body = {"model": model, **GREEDY, "max_tokens": 150}
                    reply = await client.post("/v1/completions", json=body)
                    finished[model].append(time.monotonic())
                    return reply

                return await asyncio.gather(*(one(model) for model in "ababab"))

        watch = BudgetWatch(server.url)
        try:
            replies = asyncio.run(burst())
        finally:
            watch.stop()
        assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies]
        first, second = sorted("ab", key=lambda model: min(finished[model]))
        assert max(finished[first]) < min(finished[second])  # one model, then the other
        assert _stats(http, "a")["loads"] == _stats(http, "b")["loads"] == 1  # no thrashing
        assert watch.looks, "no /stats look at all"
        for reserved, budget, holding in watch.looks:
            assert reserved <= budget and len(holding) <= 1, (reserved, budget, holding)


# -- load timeout -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timed_out_load(files: Path) -> dict:
    """One slow load past `load_timeout`, and what the server said and did about it."""
    settings = "threads = 1\nload_timeout = 0.1\n"
    config = _config(files, _model("slow", "a", **SLOW), settings)
    with run_server(["--config", str(config)], files) as server, server.http() as http:
        started = time.monotonic()
        reply = _complete(http, "slow", **GREEDY)
        return {
            "reply": reply,
            "elapsed": time.monotonic() - started,
            "states": _states(http),
            "health": http.get("/health").json(),
            "leftover": _loading_worker(server, files / "a.gguf"),
        }


def test_a_load_past_load_timeout_fails_cleanly(timed_out_load: dict) -> None:
    status, code, message = _error(timed_out_load["reply"])
    assert (status, code) == (503, "model_unavailable")
    assert "took too long" in message
    assert int(timed_out_load["reply"].headers["Retry-After"]) >= 1
    assert timed_out_load["states"]["slow"] == "failed"
    assert "slow" in timed_out_load["health"]["failed"]
    assert timed_out_load["leftover"] is None  # its worker was stopped, not left loading
    assert timed_out_load["elapsed"] < 30


def test_a_load_past_load_timeout_is_answered_soon_after_it(timed_out_load: dict) -> None:
    assert timed_out_load["elapsed"] < 0.1 + 3.0
