"""What an operator sees at start: a busy port said at once, health that tells the truth."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port, run_server


def _config(folder: Path, models: dict[str, str]) -> Path:
    path = folder / f"startup-{time.monotonic_ns()}.toml"
    path.write_text(
        "threads = 1\n"
        + "".join(f'[[models]]\nid = "{i}"\npath = "{file}"\n' for i, file in models.items())
    )
    return path


def test_busy_port_fails_at_once_with_a_clear_message(tiny_model, model_dir) -> None:
    config = _config(model_dir, {"tiny": "tiny.gguf"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        command = ["serve", "--config", str(config), "--port", str(port)]
        result = subprocess.run(
            [sys.executable, "-m", "multiserve", *command],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert time.monotonic() - started < 10  # the interpreter's start, not a model load
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--port" in result.stderr
    assert "serving" not in result.stderr and "Traceback" not in result.stderr


def test_a_ray_cluster_nobody_answers_at_is_said_at_once(tiny_model, model_dir) -> None:
    config = _config(model_dir, {"tiny": "tiny.gguf"})
    with socket.socket() as closed:  # a free port: nothing listens there
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    started = time.monotonic()
    command = ["serve", "--config", str(config), "--port", str(free_port())]
    command += ["--ray", f"127.0.0.1:{port}"]
    result = subprocess.run(
        [sys.executable, "-m", "multiserve", *command], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 30  # not Ray's minutes of retries
    assert f"cannot join the Ray cluster at 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_health_is_degraded_when_models_fail_and_503_when_none_can_serve(
    tiny_model, model_dir
) -> None:
    (model_dir / "not-a-model.gguf").write_bytes(b"this is not a GGUF file at all" * 10)
    some = _config(model_dir, {"tiny": "tiny.gguf", "gone": "missing.gguf"})
    with run_server(["--config", str(some)], model_dir) as server, server.http() as http:
        health = http.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "degraded"
        assert health.json()["failed"] == {"gone": "model file not found"}
    broken = _config(model_dir, {"gone": "missing.gguf", "junk": "not-a-model.gguf"})
    with (
        run_server(["--config", str(broken)], model_dir, ready_path="/v1/models") as server,
        server.http() as http,
    ):
        health = http.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "degraded"
        assert set(body["failed"]) == {"gone", "junk"}
        assert "not a valid GGUF file" in body["failed"]["junk"]
        assert str(model_dir) not in health.text  # no file paths to a client
