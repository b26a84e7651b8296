"""A worker that stops stepping without dying is found, killed and replaced."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx

from conftest import run_server
from test_fleet import Stream, _complete, _stats, _wait_for


def _config(model_dir: Path) -> Path:
    config = model_dir / "watchdog.toml"
    config.write_text(
        'threads = 1\n[[models]]\nid = "tiny"\npath = "tiny.gguf"\nn_ctx = 4096\n'
        "preload = true\nstall_timeout = 2\n"
    )
    return config


def test_hung_worker_is_killed_its_requests_fail_and_it_is_reloaded(tiny_model, model_dir):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3000, "ignore_eos": True}
    config = _config(model_dir)
    with run_server(["--config", str(config)], model_dir) as server, server.http() as http:
        stream = Stream(server.url, {**body, "stream": True})
        replies: list[httpx.Response] = []
        plain = threading.Thread(
            target=lambda: replies.append(http.post("/v1/completions", json=body))
        )
        plain.start()
        _wait_for(lambda: _stats(http, "tiny")["requests"]["in_flight"] == 2)
        hung = _stats(http, "tiny")["worker_pid"]
        os.kill(hung, signal.SIGSTOP)  # alive, but never steps again
        stream.finish()
        plain.join(30)
        assert stream.lines[-1] == "data: [DONE]"
        assert '"model_crashed"' in stream.lines[-2]
        assert replies[0].status_code == 503
        assert replies[0].json()["error"]["code"] == "model_crashed"
        assert "hung" in _stats(http, "tiny")["error"]
        assert "no step for" in server.output()
        _wait_for(lambda: _complete(http, "tiny").status_code == 200, timeout=20)
        assert _stats(http, "tiny")["worker_pid"] != hung
        assert _stats(http, "tiny")["loads"] == 2


def test_an_idle_worker_is_not_taken_for_a_hung_one(tiny_model, model_dir):
    config = _config(model_dir)
    with run_server(["--config", str(config)], model_dir) as server, server.http() as http:
        time.sleep(3.5)  # longer than stall_timeout with nothing to do
        body = {"prompt": "hi", "max_tokens": 3000, "ignore_eos": True}
        reply = _complete(http, "tiny", **body)  # long enough for the watchdog to look at it
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] == "length"
        assert _stats(http, "tiny")["loads"] == 1
