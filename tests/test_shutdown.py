"""SIGTERM drains in-flight work and exits 0; a killed API process leaves no workers behind."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import psutil

from conftest import run_server


def _config(model_dir: Path) -> Path:
    config = model_dir / "shutdown.toml"
    config.write_text(
        'threads = 1\ndrain_timeout = 20\n[[models]]\nid = "tiny"\npath = "tiny.gguf"\n'
        "n_ctx = 4096\npreload = true\n"
    )
    return config


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until_gone(children: list[psutil.Process], timeout: float = 10.0) -> None:
    """Children exit on their own once the API process is gone (not necessarily before it)."""
    deadline = time.monotonic() + timeout
    while not all(_gone(child.pid) for child in children):
        assert time.monotonic() < deadline, "child processes outlived the API process"
        time.sleep(0.05)


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
        workers = psutil.Process(server.process.pid).children(recursive=True)
        assert workers  # the model's worker (and the spare, once started)
        server.process.kill()
        server.process.wait()
        _wait_until_gone(workers)
