"""API keys, body limits, CORS and the loud warning for an open non-loopback bind."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from conftest import run_server
from multiserve.cli import exposure_warning
from multiserve.config import Settings

KEYS = ("k-one", "k-two")


@pytest.fixture(scope="module")
def locked_server(tiny_model: Path, model_dir: Path):
    keys_file = model_dir / "keys.txt"
    keys_file.write_text("# operators\nk-from-file\n")
    config = model_dir / "locked.toml"
    config.write_text(
        f'threads = 1\napi_keys = ["{KEYS[0]}", "{KEYS[1]}"]\napi_keys_file = "{keys_file}"\n'
        'max_body_bytes = 4096\ncors_origins = ["https://app.example"]\n'
        "requests_per_minute = 60\nrate_limit_burst = 2\n"
        '[[models]]\nid = "tiny"\npath = "tiny.gguf"\nn_ctx = 256\n'
    )
    with run_server(["--config", str(config)], model_dir) as server:
        yield server


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_every_key_source_works(locked_server) -> None:
    for key in (*KEYS, "k-from-file"):
        client = OpenAI(base_url=f"{locked_server.url}/v1", api_key=key, max_retries=0)
        assert client.models.list().data[0].id == "tiny"


def test_missing_or_wrong_key_is_401_everywhere_but_health(locked_server) -> None:
    with httpx.Client(base_url=locked_server.url) as http:
        assert http.get("/health").status_code == 200
        for path in ("/v1/models", "/stats", "/metrics"):
            error = _error(http.get(path), 401)
            assert error["type"] == "authentication_error"
        wrong = {"Authorization": "Bearer k-one-but-longer"}
        _error(
            http.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}, headers=wrong), 401
        )
        _error(http.get("/v1/models", headers={"Authorization": "Basic k-one"}), 401)
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{locked_server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_oversized_body_is_413_and_the_server_carries_on(locked_server) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    with httpx.Client(base_url=locked_server.url, headers=headers) as http:
        big = {"model": "tiny", "prompt": "x" * 10_000}
        error = _error(http.post("/v1/completions", json=big), 413)
        assert "4096" in error["message"]

        def chunks():  # no Content-Length: the limit must hold while streaming the body
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(20):
                yield b"y" * 512
            yield b'"}'

        _error(
            http.post(
                "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
            ),
            413,
        )
        ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200


def _raw_exchange(url: str, head: bytes, pieces: int = 1) -> bytes:
    """Send a request head in `pieces` writes and read the answer (the server closes after 431)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        step = -(-len(head) // pieces)
        try:
            for start in range(0, len(head), step):
                sock.sendall(head[start : start + step])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before we finished sending: the answer is already there
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # a close with unread input resets
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


@pytest.mark.parametrize(
    ("size", "pieces"),
    [(40_000, 1), (200_000, 1), (200_000, 64)],
    ids=["whole-in-one-read", "one-write", "trickled"],
)
def test_oversized_request_head_is_431_and_the_server_carries_on(
    server, size: int, pieces: int
) -> None:
    big = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"j" * size + b"\r\n\r\n"
    answer = _raw_exchange(server.url, big, pieces)
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert "32768" in body["error"]["message"]
    with server.http() as http:  # a large but legal head still works, and so does everyone else
        assert http.get("/v1/models", headers={"X-Junk": "j" * 20_000}).status_code == 200


def test_endless_chunked_trailer_closes_the_connection(server) -> None:
    # a trailer comes after the head, while the request is already running: no clean answer is
    # possible, but the server must stop reading it rather than buffer it
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    body = b'{"model": "tiny", "prompt": "hi", "max_tokens": 1}'
    chunked = b"%x\r\n%s\r\n0\r\nX-Trailer: " % (len(body), body) + b"t" * 200_000
    answer = _raw_exchange(server.url, head + chunked, pieces=64)
    assert b" 200 " not in answer.partition(b"\r\n")[0]
    with server.http() as http:
        assert http.get("/v1/models").status_code == 200


@pytest.fixture(scope="module")
def edge_server(tiny_model: Path, model_dir: Path):
    config = model_dir / "edge.toml"
    config.write_text(
        "threads = 1\nheader_timeout = 1.0\nbody_timeout = 1.0\nmax_connections = 4\n"
        "requests_per_minute = 6\nrate_limit_burst = 1\n"
        '[[models]]\nid = "tiny"\npath = "tiny.gguf"\nn_ctx = 256\n'
    )
    with run_server(["--config", str(config)], model_dir) as server:
        yield server


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_response(sock: socket.socket) -> bytes:
    """One whole response: its head, then as many body bytes as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("sent", [b"", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"])
def test_silent_or_trickling_client_is_cut_off_with_408(edge_server, sent: bytes) -> None:
    with _connect(edge_server.url) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        answer = _read_response(sock)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer
        assert 0.5 < time.monotonic() - started < 5
    with httpx.Client(base_url=edge_server.url) as http:
        assert http.get("/v1/models").status_code == 200


def test_blank_line_after_a_response_then_silence_is_cut_off(edge_server) -> None:
    # a blank line stops uvicorn's keep-alive timer without starting a request
    with _connect(edge_server.url) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 408")


def test_a_body_left_unread_cannot_hold_the_connection(edge_server) -> None:
    head = b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    with _connect(edge_server.url) as sock:
        sock.sendall(head + b"x")
        assert _read_response(sock).startswith(b"HTTP/1.1 404")  # answered, body never read
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - started < 8:
                sock.sendall(b"x")  # a trickle that would otherwise never end
                time.sleep(0.1)
        assert time.monotonic() - started < 5  # the server closed it


def test_without_keys_the_rate_is_per_address_whatever_the_headers(edge_server) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    with httpx.Client(base_url=edge_server.url) as http:
        first = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer a"})
        second = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer b"})
    assert first.status_code == 200
    assert second.status_code == 429  # an unchecked header buys no fresh bucket
    # 6 a minute: the next token is ~10 s away, less the time the first request took
    assert 8 <= int(second.headers["retry-after"]) <= 10


def test_trickled_body_is_cut_off_with_408(edge_server) -> None:
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    with _connect(edge_server.url) as sock:
        sock.sendall(head + b'{"model": ')
        answer = _read_response(sock)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer
    assert b"not received within 1 s" in answer


def test_connections_over_the_cap_get_503_at_once(edge_server) -> None:
    held = [_connect(edge_server.url) for _ in range(4)]
    try:
        with httpx.Client(base_url=edge_server.url) as http:
            refused = http.get("/v1/models")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "connections" in refused.json()["error"]["message"]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)  # the server sees the held connections go
    with httpx.Client(base_url=edge_server.url) as http:
        assert http.get("/v1/models").status_code == 200


def test_a_key_over_its_rate_gets_429_and_other_keys_do_not_notice(locked_server) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}

    def complete(key: str) -> httpx.Response:
        auth = {"Authorization": f"Bearer {key}"}
        return httpx.post(f"{locked_server.url}/v1/completions", json=body, headers=auth)

    assert [complete("k-from-file").status_code for _ in range(2)] == [200, 200]  # the burst
    # a token comes back each second: on a busy machine a request may take that long, so the
    # key goes on until refused, as a looping client would
    for _ in range(10):
        if (limited := complete("k-from-file")).status_code != 200:
            break
    error = _error(limited, 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert limited.headers["retry-after"] == "1"  # 60 a minute: a token within the second
    assert complete(KEYS[1]).status_code == 200  # another key has its own bucket
    time.sleep(1.1)  # 60 a minute: one more a second
    assert complete("k-from-file").status_code == 200


def test_cors_only_for_configured_origins(locked_server) -> None:
    with httpx.Client(base_url=locked_server.url) as http:
        preflight = {"Access-Control-Request-Method": "POST"}
        allowed = http.options(
            "/v1/completions", headers={**preflight, "Origin": "https://app.example"}
        )
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        denied = http.options(
            "/v1/completions", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in denied.headers


def test_no_cors_headers_by_default(server) -> None:
    with server.http() as http:
        response = http.get("/v1/models", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers


def test_open_non_loopback_bind_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MULTISERVE_API_KEYS", raising=False)
    assert exposure_warning(Settings(host="127.0.0.1")) is None
    assert exposure_warning(Settings(host="::1")) is None
    assert exposure_warning(Settings(host="0.0.0.0", api_keys=["k"])) is None
    warning = exposure_warning(Settings(host="0.0.0.0"))
    assert warning is not None and "0.0.0.0" in warning and "API keys" in warning
