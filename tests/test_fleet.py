"""Several models behind one server: lazy loads, memory budget, eviction, admission, crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import run_server
from multiserve.fleet import admission
from multiserve.fleet.admission import Admission, Overloaded
from tiny_gguf import write_tiny_model

LONG = {"prompt": "hello", "max_tokens": 4000, "stream": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fleet")
    for i, name in enumerate("abc"):
        write_tiny_model(folder / f"{name}.gguf", seed=i, n_ctx_train=8192)
    data = (folder / "a.gguf").read_bytes()
    (folder / "truncated.gguf").write_bytes(data[: len(data) // 2])
    # a sound header llama.cpp still refuses: an architecture it does not know
    (folder / "alien.gguf").write_bytes(data.replace(b"llama", b"lla_a"))
    return folder


# Each tiny model is estimated at ~91 MiB (64 MiB worker overhead, 8 MiB KV, compute buffers)
ROOM_FOR_ONE = 'memory_budget = "140MiB"\n'
ROOM_FOR_TWO = 'memory_budget = "230MiB"\n'


def _config(folder: Path, body: str, settings: str = "threads = 1\n") -> Path:
    path = folder / f"config-{time.monotonic_ns()}.toml"
    path.write_text(settings + body)
    return path


def _model(name: str, file: str | None = None, n_ctx: int = 4096, **fields: object) -> str:
    lines = [f'[[models]]\nid = "{name}"\npath = "{file or name}.gguf"\nn_ctx = {n_ctx}']
    lines += [
        f"{key} = {str(v).lower() if isinstance(v, bool) else v!r}".replace("'", '"')
        for key, v in fields.items()
    ]
    return "\n".join(lines) + "\n"


def _stats(http: httpx.Client, model: str) -> dict:
    return http.get("/stats").json()["models"][model]


def _states(http: httpx.Client) -> dict[str, str]:
    return {card["id"]: card["state"] for card in http.get("/v1/models").json()["data"]}


def _complete(http: httpx.Client, model: str, **extra: object) -> httpx.Response:
    return http.post(
        "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2, **extra}
    )


def _wait_for(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    explain: Callable[[], object] = lambda: "",
) -> None:
    """Poll `predicate` until true; on time out, say what `explain` says about why."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not reached in time {explain()}"
        time.sleep(0.05)


class Stream:
    """A streaming request held open in a background thread until `close`."""

    def __init__(self, url: str, body: dict) -> None:
        self.status: int | None = None
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self._thread.start()
        assert self._started.wait(20), "stream did not start"

    def _run(self, url: str, body: dict) -> None:
        with (
            httpx.Client(base_url=url, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as response,
        ):
            self.status = response.status_code
            for line in response.iter_lines():
                if line:
                    self.lines.append(line)
                    self._started.set()
                if self._stop.is_set():
                    return
        self._started.set()

    def close(self) -> None:
        """Hang up (the client goes away)."""
        self._stop.set()
        self._thread.join(20)

    def finish(self) -> None:
        """Read to the end of the stream."""
        self._thread.join(20)
        assert not self._thread.is_alive()


def test_models_load_lazily_and_concurrent_requests_share_one_load(models: Path) -> None:
    config = _config(models, _model("a") + _model("b") + _model("c"))
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        assert _states(http) == {"a": "unloaded", "b": "unloaded", "c": "unloaded"}

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                body = {"model": "b", "prompt": "hi", "max_tokens": 3}
                calls = [client.post("/v1/completions", json=body) for _ in range(10)]
                return [r.status_code for r in await asyncio.gather(*calls)]

        assert asyncio.run(burst()) == [200] * 10
        assert _states(http) == {"a": "unloaded", "b": "loaded", "c": "unloaded"}
        assert _stats(http, "b")["loads"] == 1
        estimate = _stats(http, "b")["memory_bytes"]
        assert estimate["estimate"]["total"] > estimate["estimate"]["weights"] > 0
        assert estimate["rss"] > 0


def test_lru_eviction_under_a_small_budget(models: Path) -> None:
    config = _config(
        models, _model("a") + _model("b") + _model("c"), "threads = 1\n" + ROOM_FOR_TWO
    )
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        assert _complete(http, "a").status_code == 200
        assert _complete(http, "b").status_code == 200
        assert _complete(http, "a").status_code == 200  # b is now least recently used
        assert _complete(http, "c").status_code == 200
        assert _states(http) == {"a": "loaded", "b": "unloaded", "c": "loaded"}
        reserved = http.get("/stats").json()["memory"]
        assert reserved["reserved"] <= reserved["budget"]


def test_busy_model_keeps_its_turn_and_a_cold_request_waits_then_times_out(
    models: Path,
) -> None:
    settings = f"threads = 1\n{ROOM_FOR_ONE}model_turn = 60\n"
    config = _config(models, _model("a") + _model("b", queue_timeout=3), settings)
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        stream = Stream(server.url, {"model": "a", **LONG})
        try:
            replies: dict[str, httpx.Response] = {}
            started = time.monotonic()
            cold = threading.Thread(target=lambda: replies.update(b=_complete(http, "b")))
            cold.start()
            _wait_for(lambda: _stats(http, "b")["requests"]["in_system"] == 1)
            with server.http() as other:  # within its turn, a still takes new requests
                assert _complete(other, "a").status_code == 200
            assert time.monotonic() - started < 2.5 and cold.is_alive()
            cold.join(10)
            assert time.monotonic() - started >= 2.9  # it waited for room, not refused at once
            assert replies["b"].status_code == 503, replies["b"].text
            assert replies["b"].json()["error"]["code"] == "queue_timeout"
            assert _states(http) == {"a": "loaded", "b": "unloaded"}
            assert stream.status == 200 and not stream.lines[-1].startswith('data: {"error')
        finally:
            stream.close()
        _wait_for(lambda: _stats(http, "a")["requests"]["in_system"] == 0)
        assert _complete(http, "b").status_code == 200  # a is idle now: evicted for b
        assert _states(http) == {"a": "unloaded", "b": "loaded"}


def test_cold_model_waits_for_a_busy_one_to_finish_its_turn(models: Path) -> None:
    # a has had its turn at once (model_turn = 0): it takes no new requests, finishes its
    # stream, gives its memory to b; a's next request waits for b in turn, and nothing is refused
    settings = f"threads = 1\n{ROOM_FOR_ONE}model_turn = 0\n"
    config = _config(models, _model("a") + _model("b"), settings)
    body = {"model": "a", "prompt": "hello", "max_tokens": 600, "stream": True, "ignore_eos": True}
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        stream = Stream(server.url, body)
        replies: dict[str, httpx.Response] = {}
        cold = threading.Thread(target=lambda: replies.update(b=_complete(http, "b")))
        cold.start()
        _wait_for(lambda: _stats(http, "b")["requests"]["in_system"] == 1)
        with server.http() as other:
            again = threading.Thread(target=lambda: replies.update(a=_complete(other, "a")))
            again.start()
            stream.finish()
            cold.join(30)
            again.join(30)
        assert stream.lines[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in stream.lines[-2]  # a's stream was not cut
        assert replies["b"].status_code == 200, replies["b"].text
        assert replies["a"].status_code == 200, replies["a"].text
        assert _stats(http, "a")["loads"] == 2 and _stats(http, "b")["loads"] == 1
        assert _states(http) == {"a": "loaded", "b": "unloaded"}
        for model in "ab":
            requests = _stats(http, model)["requests"]
            assert requests["refused"] == requests["failed"] == 0


def test_client_gone_while_waiting_for_room_gives_up_its_place(models: Path) -> None:
    settings = f"threads = 1\n{ROOM_FOR_ONE}model_turn = 60\n"
    config = _config(models, _model("a") + _model("b"), settings)
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        stream = Stream(server.url, {"model": "a", **LONG})
        try:
            with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=1.0) as impatient:
                impatient.post(f"{server.url}/v1/completions", json={"model": "b", "prompt": "hi"})
            _wait_for(lambda: _stats(http, "b")["requests"]["in_system"] == 0, timeout=3)
            assert not _stats(http, "a")["giving_way"]
        finally:
            stream.close()
        time.sleep(1.0)  # a is idle now: a load still waiting would take its room
        assert _states(http) == {"a": "loaded", "b": "unloaded"}


def test_model_larger_than_the_budget_is_refused_without_retry(models: Path) -> None:
    settings = f"threads = 1\n{ROOM_FOR_ONE}"
    config = _config(models, _model("a") + _model("huge", "b", n_parallel=64), settings)
    listing = subprocess.run(
        [sys.executable, "-m", "multiserve", "models", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert listing.returncode == 1
    assert "more than the" in listing.stdout and "memory budget" in listing.stdout
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        assert "huge needs" in server.output()  # said at start
        health = http.get("/health")
        assert health.status_code == 200  # a still serves
        assert health.json()["status"] == "degraded"
        assert "memory budget" in health.json()["failed"]["huge"]
        refused = _complete(http, "huge")
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "model_too_large"
        assert "Retry-After" not in refused.headers
        assert _complete(http, "a").status_code == 200


class FakeClock:
    """Stands in for admission's `time` module: seconds pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(admission, "time", fake)
    return fake


def _hold_places(queue: Admission, clock: FakeClock, seconds: float, requests: int) -> None:
    """`requests` requests, one after another, each keeping its place for `seconds`."""
    for _ in range(requests):
        ticket = queue.enter()
        clock.now += seconds
        ticket.release()


def _refused_retry_after(queue: Admission) -> int:
    """The Retry-After of a request that finds `queue` full (it is left full)."""
    while queue.in_system < queue.capacity:
        queue.enter()
    with pytest.raises(Overloaded) as refused:
        queue.enter()
    return refused.value.retry_after


# held seconds are not whole: the mean nears them from one side, and Retry-After is its ceiling
@pytest.mark.parametrize(("held", "expected"), [(0.2, 1), (3.6, 4), (12.3, 13), (600.0, 60)])
def test_retry_after_is_how_long_recent_requests_held_their_place(
    clock: FakeClock, held: float, expected: int
) -> None:
    queue = Admission(slots=2, queue_limit=3)
    assert queue.retry_after() == 1  # nothing known yet: the starting guess
    _hold_places(queue, clock, held, requests=30)
    assert queue.retry_after() == expected  # clamped to 1..60 s
    assert _refused_retry_after(queue) == expected  # a full queue is not multiplied out


def test_retry_after_follows_recent_requests_not_old_or_single_ones(clock: FakeClock) -> None:
    queue = Admission(slots=1, queue_limit=1)
    _hold_places(queue, clock, 20.5, requests=30)
    _hold_places(queue, clock, 2.5, requests=30)
    assert queue.retry_after() == 3  # the old, slow requests have faded out
    _hold_places(queue, clock, 59.5, requests=1)
    assert 3 < queue.retry_after() < 30  # one slow request moves it, but does not take it over


def test_retry_after_is_about_how_long_requests_recently_held_their_place(models: Path) -> None:
    """End to end: requests that each waited 2.5 s in the queue (and timed out) make the next
    refusal say Retry-After 3, where before anyone left it said the starting guess, 1."""
    queued = 8  # enough for the smoothed mean to come within a second of 2.5 s
    spec = _model(
        "a", n_ctx=8192, n_parallel=1, queue_limit=queued, queue_timeout=2.5, preload=True
    )
    config = _config(models, spec)
    with (
        run_server(["--config", str(config)], models) as server,
        server.http() as http,
        ThreadPoolExecutor(queued) as pool,
    ):

        def fill_queue() -> list[Future[httpx.Response]]:
            waiting = [pool.submit(_complete, http, "a") for _ in range(queued)]
            _wait_for(
                lambda: _stats(http, "a")["requests"]["in_system"] == queued + 1,
                explain=lambda: (_stats(http, "a")["requests"], running.lines[-1:]),
            )
            return waiting

        def refusal_retry_after() -> int:
            started = time.monotonic()
            refused = _complete(http, "a")
            assert time.monotonic() - started < 1.0  # refused at once, not queued
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "queue_full"
            return int(refused.headers["Retry-After"])

        running = Stream(server.url, {"model": "a", **LONG, "max_tokens": 8000})  # the one slot
        try:
            first = fill_queue()
            assert refusal_retry_after() == 1
            for reply in (future.result(timeout=30) for future in first):
                assert reply.json()["error"]["code"] == "queue_timeout", reply.text
            second = fill_queue()
            assert 3 <= refusal_retry_after() <= 4  # ceil(2.5 s and a little), on a busy machine
            assert running.status == 200 and not running.lines[-1].startswith('data: {"error')
        finally:
            running.close()
        assert [future.result(timeout=30).status_code for future in second] == [200] * queued


def test_queue_timeout_refuses_and_leaves_the_queue(models: Path) -> None:
    config = _config(models, _model("a", n_parallel=1, queue_timeout=0.5, preload=True))
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        running = Stream(server.url, {"model": "a", **LONG})
        try:
            late = _complete(http, "a", stream=True)
            assert late.status_code == 503, late.text
            assert late.json()["error"]["code"] == "queue_timeout"
            assert "Retry-After" in late.headers
            assert _stats(http, "a")["requests"]["waiting"] == 0
        finally:
            running.close()


def test_client_that_disconnects_while_queued_never_runs(models: Path) -> None:
    config = _config(models, _model("a", n_parallel=1, preload=True))
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        running = Stream(server.url, {"model": "a", **LONG})
        with pytest.raises(httpx.ReadTimeout):  # gives up while queued behind `running`
            http.post("/v1/completions", json={"model": "a", **LONG, "stream": False}, timeout=0.5)
        _wait_for(lambda: _stats(http, "a")["requests"]["in_system"] == 1)
        _wait_for(lambda: _stats(http, "a")["requests"]["waiting"] == 0)  # the cancel reached it
        running.close()
        # had the abandoned request stayed queued, it would now take the freed slot
        _wait_for(lambda: _stats(http, "a")["requests"]["running"] == 0, timeout=3)
        time.sleep(0.3)
        assert _stats(http, "a")["requests"]["running"] == 0


def test_killed_worker_fails_its_requests_only_and_reloads_later(models: Path) -> None:
    config = _config(models, _model("a", preload=True) + _model("b", preload=True))
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        victim = Stream(server.url, {"model": "a", **LONG})
        os.kill(_stats(http, "a")["worker_pid"], signal.SIGKILL)
        victim.finish()
        assert victim.lines[-1] == "data: [DONE]"
        assert "model_crashed" in victim.lines[-2]
        assert _states(http)["a"] == "failed"
        assert _complete(http, "b").status_code == 200  # the other model never noticed
        _wait_for(lambda: _complete(http, "a").status_code == 200, timeout=15)
        assert _stats(http, "a")["loads"] == 2


def test_corrupt_and_missing_files_fail_cleanly_while_others_serve(models: Path) -> None:
    body = _model("trunc", "truncated") + _model("alien") + _model("gone", "missing") + _model("a")
    config = _config(models, body)
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        assert _states(http)["gone"] == "failed"
        for name, words in (
            ("trunc", "not a valid GGUF"),
            ("alien", "failed to load"),
            ("gone", "not found"),
        ):
            response = _complete(http, name)
            assert response.status_code == 503, name
            message = response.json()["error"]["message"]
            assert words in message, message
            assert str(models) not in message
        assert _complete(http, "a").status_code == 200
        assert server.process.poll() is None


def test_idle_ttl_unloads_and_pinned_models_stay(models: Path) -> None:
    # pinned b idles first, with the shorter TTL, and is swept first: were pinning ignored, the
    # sweep that unloads a would already have unloaded b
    config = _config(models, _model("b", idle_ttl=0.5, pinned=True) + _model("a", idle_ttl=1.0))
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        assert _complete(http, "b").status_code == 200
        assert _complete(http, "a").status_code == 200
        _wait_for(lambda: _states(http)["a"] == "unloaded", timeout=8)
        time.sleep(1.5)  # and another sweep (one a second) at least, whatever its order
        assert _states(http)["b"] == "loaded"
        assert _stats(http, "b")["loads"] == 1


def test_load_and_unload_endpoints(models: Path) -> None:
    config = _config(models, _model("a"))
    with run_server(["--config", str(config)], models) as server, server.http() as http:
        assert http.post("/v1/models/a/load").json()["state"] == "loaded"
        stream = Stream(server.url, {"model": "a", **LONG})
        busy = http.post("/v1/models/a/unload")
        assert busy.status_code == 409
        assert busy.json()["error"]["code"] == "model_busy"
        threading.Timer(0.5, stream.close).start()
        assert (
            http.post("/v1/models/a/unload", params={"wait": "true"}).json()["state"] == "unloaded"
        )
        assert http.post("/v1/models/nope/load").status_code == 404


def test_models_command_lists_size_memory_and_state(models: Path) -> None:
    config = _config(models, _model("a") + _model("gone", "missing"))
    result = subprocess.run(
        [sys.executable, "-m", "multiserve", "models", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 1, result.stderr  # one model cannot load
    assert "KiB" in result.stdout and "MiB" in result.stdout
    assert "file not found" in result.stdout
