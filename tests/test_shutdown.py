"""SIGTERM drains in-flight work and exits 0; a killed API process leaves no workers behind."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from conftest import run_server


def _config(model_dir: Path, drain_timeout: float = 20) -> Path:
    config = model_dir / f"shutdown-{drain_timeout}.toml"
    config.write_text(
        f'threads = 1\ndrain_timeout = {drain_timeout}\n[[models]]\nid = "tiny"\n'
        'path = "tiny.gguf"\nn_ctx = 8192\npreload = true\n'
    )
    return config


ENDLESS = {"model": "tiny", "prompt": "hi", "max_tokens": 8000, "ignore_eos": True}


class _Requests:
    """Two streams and one plain request that would run far past the drain timeout."""

    def __init__(self, url: str) -> None:
        self.streams: list[list[str]] = [[], []]
        self.plain: httpx.Response | None = None
        self._threads = [
            threading.Thread(target=self._stream, args=(url, lines)) for lines in self.streams
        ]
        self._threads.append(threading.Thread(target=self._plain, args=(url,)))
        for thread in self._threads:
            thread.start()
        with httpx.Client(base_url=url, timeout=10) as http:  # all three running in the worker
            while http.get("/stats").json()["models"]["tiny"]["requests"]["in_flight"] < 3:
                time.sleep(0.01)
        while not all(self.streams):
            time.sleep(0.01)

    def _stream(self, url: str, lines: list[str]) -> None:
        with (
            httpx.Client(base_url=url, timeout=60) as http,
            http.stream("POST", "/v1/completions", json={**ENDLESS, "stream": True}) as response,
        ):
            lines.extend(line for line in response.iter_lines() if line)

    def _plain(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            self.plain = http.post("/v1/completions", json=ENDLESS)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(30)


def _assert_cut_cleanly(requests: _Requests, log: str) -> None:
    for lines in requests.streams:
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert requests.plain is not None and requests.plain.status_code == 503
    assert requests.plain.json()["error"]["code"] == "shutting_down"
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert log.count("cut short") == 3, log  # one line per cut request


def test_requests_past_the_drain_timeout_are_cut_cleanly(tiny_model, model_dir) -> None:
    with run_server(["--config", str(_config(model_dir, drain_timeout=1))], model_dir) as server:
        requests = _Requests(server.url)
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - started < 5  # the drain timeout, then a prompt exit
        requests.join()
        _assert_cut_cleanly(requests, server.output())


def test_second_signal_stops_at_once_and_quietly(tiny_model, model_dir) -> None:
    with run_server(["--config", str(_config(model_dir, drain_timeout=60))], model_dir) as server:
        requests = _Requests(server.url)
        server.process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - started < 3
        requests.join()
        _assert_cut_cleanly(requests, server.output())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until(
    done: Callable[[], bool], explain: Callable[[], str], timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, explain()
        time.sleep(0.05)


def _wait_until_gone(children: list[psutil.Process]) -> None:
    """Children exit on their own once the API process is gone (not necessarily before it)."""

    def alive() -> list[int]:
        return [child.pid for child in children if not _gone(child.pid)]

    _wait_until(lambda: not alive(), lambda: f"outlived the API process: {alive()}")


def _workers(api: psutil.Process) -> set[int]:
    """Pids of the API process's spawned workers (multiprocessing's resource tracker aside)."""
    return {child.pid for child in api.children() if "spawn_main" in " ".join(child.cmdline())}


def test_sigterm_finishes_streams_refuses_new_work_and_exits_zero(tiny_model, model_dir) -> None:
    with run_server(["--config", str(_config(model_dir))], model_dir) as server:
        workers = psutil.Process(server.process.pid).children(recursive=True)
        lines: list[str] = []
        body = {
            "model": "tiny",
            "prompt": "hi",
            "max_tokens": 3000,
            "stream": True,
            "ignore_eos": True,
        }

        def stream() -> None:
            with (
                httpx.Client(base_url=server.url, timeout=60) as http,
                http.stream("POST", "/v1/completions", json=body) as response,
            ):
                lines.extend(line for line in response.iter_lines() if line)

        reader = threading.Thread(target=stream)
        reader.start()
        while not lines:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with server.http() as http:
            health = http.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "draining"
            refused = http.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
        reader.join(30)
        assert lines[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in lines[-2]  # the stream ran to its end
        assert server.process.wait(timeout=30) == 0
        _wait_until_gone(workers)


def test_killed_api_process_takes_its_workers_along(tiny_model, model_dir) -> None:
    with run_server(["--config", str(_config(model_dir))], model_dir) as server:
        api = psutil.Process(server.process.pid)
        with server.http() as http:
            loaded = http.get("/stats").json()["models"]["tiny"]["worker_pid"]
        # the blank spare starts a few seconds after the load: the model's worker is not alone
        _wait_until(lambda: len(_workers(api) - {loaded}) == 1, lambda: "no spare", timeout=30)
        assert loaded in _workers(api)
        children = api.children(recursive=True)  # both workers, and the resource tracker
        server.process.kill()
        server.process.wait()
        _wait_until_gone(children)
