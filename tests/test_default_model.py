"""The embedded default model (Gemma 3 270M) through the real server: catches a bad llama.cpp build.

A miscompiled kernel shows up as a crash in llama_decode or as garbage; greedy continuations of
well-known sequences catch both.
"""

from __future__ import annotations

import pytest

from conftest import run_server
from multiserve.models.default import DEFAULT_MODEL_ID, default_model_path


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory):
    default_model_path(show_progress=False)  # assemble once, outside the server's start timeout
    with run_server([], tmp_path_factory.mktemp("default")) as server:
        yield server


def test_default_model_is_assembled_and_verified() -> None:
    path = default_model_path(show_progress=False)
    assert path.stat().st_size > 200_000_000
    assert path.with_suffix(".sha256").exists()


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Monday, Tuesday, Wednesday,", " Thursday, Friday"),
        ("The capital of France is Paris. The capital of Germany is", " Berlin"),
        ("1, 2, 3, 4, 5,", " 6, 7,"),
    ],
)
def test_default_model_continues_known_sequences(default_server, prompt: str, expected: str):
    reply = default_server.openai.completions.create(
        model=DEFAULT_MODEL_ID, prompt=prompt, max_tokens=6, temperature=0
    )
    assert reply.choices[0].text.startswith(expected)


def test_default_model_chats_and_streams(default_server) -> None:
    stream = default_server.openai.chat.completions.create(
        model=DEFAULT_MODEL_ID,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage.completion_tokens >= 1


def test_default_model_batches_concurrent_streams(default_server) -> None:
    reply = default_server.openai.completions.create(
        model=DEFAULT_MODEL_ID,
        prompt="Once upon a time",
        n=4,
        max_tokens=8,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert len(reply.choices) == 4
    assert reply.usage.completion_tokens == 32
