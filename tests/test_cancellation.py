"""A client that goes away frees its slots and KV cells at once, and leaves nothing wrong behind.

Each case hangs up at a chosen moment (a bare socket, so the moment is the test's), then checks
that /stats shows nothing running well before the abandoned request could have finished by
itself, and that the next request answers exactly what the same request answered before on this
server with `cache_prompt: false` (read afresh, alone). Single-slot and four-slot models make
the next request land in the very slots the abandoned one held: a slot never freed would make it
wait (and time out), cells not cleared or cut at the wrong length would change its tokens.
Every run here is alone on its model, in the same batch shapes, so answers are compared exactly
(checked: their logprobs agree to the last bit, cached prefix or not).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import BACKENDS, RunningServer, serving_on
from test_fleet import Stream, _config, _model, _stats, _wait_for

ONE = "one-slot"  # every request uses sequence 0: the next one gets exactly the abandoned cells
FOUR = "four-slots"  # n = 4 takes every slot
IDLE_WITHIN = 3.0  # seconds; each abandoned request would run for far longer by itself


@pytest.fixture(scope="module", params=BACKENDS)
def one_and_four(
    request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """Both models, on local workers and on a two-node Ray cluster (where the cancel crosses
    the worker's own TCP connection)."""
    folder = tmp_path_factory.mktemp("cancellation")
    (folder / "tiny.gguf").symlink_to(tiny_model)
    models = _model(ONE, "tiny", n_ctx=4096, n_parallel=1, step_tokens=16, preload=True)
    models += _model(FOUR, "tiny", n_ctx=4096, n_parallel=4, step_tokens=64, preload=True)
    with serving_on(request.param, _config(folder, models)) as running:
        yield running


class RawRequest:
    """A POST on a bare socket, so the test decides the moment the client goes away."""

    def __init__(self, server: RunningServer, body: dict) -> None:
        host, port = server.url.removeprefix("http://").split(":")
        self._sock = socket.create_connection((host, int(port)), timeout=30)
        data = json.dumps(body).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self._sock.sendall(head.encode() + data)

    def status(self) -> int:
        """The response's status (a stream's head is sent once the worker accepted it)."""
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._sock.recv(4096)
            assert chunk, "the server closed the connection"
            head += chunk
        return int(head.split(b" ", 2)[1])

    def hang_up(self) -> None:
        self._sock.close()


def _complete(http: httpx.Client, body: dict) -> dict:
    reply = http.post("/v1/completions", json={"logprobs": 1, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def _answers(reply: dict) -> list[tuple[str, list[str]]]:
    """Each choice's text and tokens, in choice order."""
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    return [(c["text"], c["logprobs"]["tokens"]) for c in choices]


def _wait_idle(http: httpx.Client, model: str, within: float = IDLE_WITHIN) -> None:
    """Nothing of `model` running, queued or held, within `within` seconds of a hang-up."""

    def idle() -> bool:
        requests = _stats(http, model)["requests"]
        return all(requests[key] == 0 for key in ("running", "waiting", "in_flight", "in_system"))

    _wait_for(idle, timeout=within)


def test_client_gone_during_a_chunked_prefill(one_and_four: RunningServer) -> None:
    """~1000 prompt tokens read 16 a step take about a second: the client leaves right after
    its stream was accepted, in the middle of the reading."""
    prompt = f"{uuid.uuid4().hex} " + "hello world " * 500
    greedy = {
        "model": ONE,
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
    }
    other = {**greedy, "prompt": f"{uuid.uuid4().hex} the red dog"}
    with one_and_four.http() as http:
        reference = _complete(http, {**greedy, "cache_prompt": False})
        other_reference = _complete(http, {**other, "cache_prompt": False})

        abandoned = RawRequest(one_and_four, {**greedy, "max_tokens": 2000, "stream": True})
        assert abandoned.status() == 200  # accepted: its prompt is being read now
        abandoned.hang_up()
        _wait_idle(http, ONE)

        again = _complete(http, greedy)  # reuses whatever part of the prompt was read
        assert _answers(again) == _answers(reference)
        usage = again["usage"]
        assert usage["prompt_tokens"] == reference["usage"]["prompt_tokens"] > 900
        # fewer cached tokens than a whole read would leave: the reading was cut short
        assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"] - 1
        assert _answers(_complete(http, {**other, "cache_prompt": False})) == _answers(
            other_reference
        )
        _wait_idle(http, ONE)


def test_client_gone_from_a_forked_request(one_and_four: RunningServer) -> None:
    """n = 4 reads its prompt once and forks it into every slot; the client leaves once all
    four choices stream, and the next n = 4 request needs all four slots back."""
    greedy = {
        "model": FOUR,
        "prompt": f"{uuid.uuid4().hex} the cat and the dog",
        "n": 4,
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
    }
    with one_and_four.http() as http:
        reference = _complete(http, {**greedy, "cache_prompt": False})
        assert len({text for text, _ in _answers(reference)}) == 1  # greedy: four equal choices

        sampled = {**greedy, "max_tokens": 4000, "temperature": 1.0, "seed": 5, "stream": True}
        stream = Stream(one_and_four.url, sampled)
        try:
            _wait_for(lambda: _indices(stream.lines) == {0, 1, 2, 3})
            assert _stats(http, FOUR)["requests"]["running"] == 1
        finally:
            stream.close()
        _wait_idle(http, FOUR)

        again = _complete(http, greedy)  # waits forever if a fork still held its slot
        assert _answers(again) == _answers(reference)
        _wait_idle(http, FOUR)


def _indices(lines: list[str]) -> set[int]:
    """Choice indices seen in a completions stream's data lines so far."""
    seen = set()
    for line in list(lines):
        if line.startswith("data: {"):
            seen |= {choice["index"] for choice in json.loads(line[6:])["choices"]}
    return seen


def test_client_gone_during_a_non_stream_decode(one_and_four: RunningServer) -> None:
    """A non-streamed request sends nothing until it is done; its client leaves while it
    decodes (3000 tokens: several seconds), and its slot keeps only a reusable prompt."""
    greedy = {
        "model": ONE,
        "prompt": f"{uuid.uuid4().hex} a good day",
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
    }
    with one_and_four.http() as http:
        reference = _complete(http, {**greedy, "cache_prompt": False})

        abandoned = RawRequest(one_and_four, {**greedy, "max_tokens": 3000})
        _wait_for(lambda: _stats(http, ONE)["requests"]["running"] == 1)
        time.sleep(0.3)  # its prompt (a few tokens, one step) is read: it is decoding
        abandoned.hang_up()
        _wait_idle(http, ONE)

        again = _complete(http, greedy)  # from the abandoned slot, cut back to the prompt
        assert _answers(again) == _answers(reference)
        usage = again["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
        _wait_idle(http, ONE)
