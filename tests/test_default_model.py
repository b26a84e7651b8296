"""The embedded default model (Gemma 3 270M) through the real server: catches a bad llama.cpp build.

A miscompiled kernel shows up as a crash in llama_decode or as garbage; greedy continuations of
well-known sequences catch both.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shlex
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from openai import AsyncOpenAI

from conftest import run_server
from multiserve.cli import build_parser
from multiserve.config import EMBEDDED_MAX_TOKENS, load_settings
from multiserve.models.default import DEFAULT_EMBEDDINGS_ID, DEFAULT_MODEL_ID, default_model_path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory):
    default_model_path(show_progress=False)  # assemble once, outside the server's start timeout
    with run_server([], tmp_path_factory.mktemp("default")) as server:
        yield server


def test_default_model_is_assembled_and_verified() -> None:
    path = default_model_path(show_progress=False)
    assert path.stat().st_size > 200_000_000
    assert path.with_suffix(".sha256").exists()


# Prompts whose greedy continuation any sound build of the model knows.
KNOWN_SEQUENCES = [
    ("Monday, Tuesday, Wednesday,", " Thursday, Friday"),
    ("The capital of France is Paris. The capital of Germany is", " Berlin"),
    ("1, 2, 3, 4, 5,", " 6, 7,"),
    ("January, February, March,", " April, May"),
]


@pytest.mark.parametrize(("prompt", "expected"), KNOWN_SEQUENCES)
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


@dataclass
class _TimedStream:
    """What one streamed completion said, and when its first token and its end arrived."""

    text: str = ""
    first_token: float = math.inf  # time.monotonic() of the first text
    finished: float = math.inf  # ... and of the chunk with the finish reason
    finish_reason: str | None = None
    completion_tokens: int = 0


async def _timed_stream(client: AsyncOpenAI, prompt: str, max_tokens: int) -> _TimedStream:
    result = _TimedStream()
    stream = await client.completions.create(
        model=DEFAULT_MODEL_ID,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            result.completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.text:
                result.first_token = min(result.first_token, time.monotonic())
                result.text += choice.text
            if choice.finish_reason is not None:
                result.finished, result.finish_reason = time.monotonic(), choice.finish_reason
    return result


def test_default_model_batches_concurrent_streams(default_server) -> None:
    """Separate streaming requests run at once, each with its own correct greedy text.

    Every stream has its first token before any stream ends, which a server running requests
    one after another cannot do; 24 tokens each (about a second) leave a wide margin for requests
    that reach the worker a few steps apart.
    """
    max_tokens = 24

    async def run() -> list[_TimedStream]:
        client = AsyncOpenAI(
            base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0, timeout=120
        )
        async with client:
            calls = [_timed_stream(client, prompt, max_tokens) for prompt, _ in KNOWN_SEQUENCES]
            return await asyncio.gather(*calls)

    streams = asyncio.run(run())
    for (_, expected), stream in zip(KNOWN_SEQUENCES, streams, strict=True):
        assert stream.text.startswith(expected), stream.text
        assert (stream.finish_reason, stream.completion_tokens) == ("length", max_tokens)
    last_start = max(s.first_token for s in streams)
    first_end = min(s.finished for s in streams)
    assert last_start < first_end, "a stream ended before another had started: not batched"


def _readme_commands() -> list[str]:
    """Every command of the README's `sh` blocks, continuation lines joined."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def test_readme_curl_examples_answer(default_server) -> None:
    curls = [c for c in _readme_commands() if c.startswith("curl ")]
    assert curls
    address = default_server.url.removeprefix("http://")
    for command in curls:
        argv = [a.replace("127.0.0.1:8082", address) for a in shlex.split(command)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
        reply = json.loads(out)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length"), out
        assert reply["usage"]["completion_tokens"] <= 64


def test_readme_python_examples_run(default_server) -> None:
    """The README's tool round trip and embeddings call, run as written on the default model."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    names: dict = {}
    for block in blocks:
        code = textwrap.dedent(block).replace(
            "127.0.0.1:8082", default_server.url.removeprefix("http://")
        )
        exec(compile(code, "README.md", "exec"), names)
    assert len(blocks) == 2
    vectors = np.array(names["vectors"])
    assert vectors.shape == (2, 640) and np.allclose(np.linalg.norm(vectors, axis=1), 1)
    assert names["reply"].choices[0].finish_reason == "tool_calls"
    assert isinstance(json.loads(names["call"].function.arguments)["city"], str)
    assert names["answer"].usage.prompt_tokens > names["reply"].usage.prompt_tokens


def test_readme_multiserve_commands_parse() -> None:
    commands = [c for c in _readme_commands() if c.startswith(".venv/bin/multiserve ")]
    assert len(commands) >= 5
    for command in commands:
        argv = [a for a in shlex.split(command)[1:] if a != "..."]
        if "..." in command:  # "the same as above, plus": the flags must parse on their own
            argv = [*argv, "--url", "http://x", "--model", "m"]
        build_parser().parse_args(argv)  # exits (SystemExit) on any flag the CLI does not know
        for config in [Path(a) for a in argv if a.endswith(".toml")]:
            load_settings(ROOT / config)


def test_request_without_max_tokens_gets_the_embedded_models_ceiling(default_server) -> None:
    reply = default_server.openai.chat.completions.create(
        model=DEFAULT_MODEL_ID,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == EMBEDDED_MAX_TOKENS


def test_default_model_makes_a_schema_valid_tool_call(default_server) -> None:
    """Gemma 3's template knows no tools: the generic layout, held from the first token, makes
    even this small base model return a call whose arguments match the schema."""
    parameters = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["city", "unit", "days"],
    }
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
    reply = default_server.openai.chat.completions.create(
        model=DEFAULT_MODEL_ID,
        messages=[{"role": "user", "content": "What is the weather in Paris for 3 days?"}],
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    answer = reply.choices[0]
    assert answer.finish_reason == "tool_calls"
    [call] = answer.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), parameters)


def test_default_model_answers_embeddings_from_its_own_worker(default_server) -> None:
    """With no config, /v1/embeddings works on the default model's id: its embeddings companion
    (the same file in an embeddings context) loads on the first request, beside the chat worker.

    Eight inputs fill one step (512 tokens): the vectors are finite, unit length, the same on a
    second run, and each one its input's alone, as near as llama.cpp's kernels allow (a vector
    drifts with the batch around it, to a cosine of 0.9995 here; two texts are far apart); the
    worker's memory, with a full step's outputs, stays within its estimate."""
    texts = [
        f"{i}: " + f"{prompt} {expected} " * 4
        for i, (prompt, expected) in enumerate(KNOWN_SEQUENCES * 2)
    ]

    def embed(inputs: list[str]) -> tuple[np.ndarray, int]:
        reply = default_server.openai.embeddings.create(model=DEFAULT_MODEL_ID, input=inputs)
        assert reply.model == DEFAULT_MODEL_ID
        return np.array([item.embedding for item in reply.data]), reply.usage.prompt_tokens

    with default_server.http() as http:
        vectors, tokens = embed(texts)
        assert 400 < tokens <= 512
        assert vectors.shape == (8, 640) and np.isfinite(vectors).all()
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        alone = np.array([embed([text])[0][0] for text in texts[:3]])
        assert (embed(texts[:1])[0][0] == alone[0]).all()
        assert (np.sum(alone * vectors[:3], axis=1) > 0.999).all()
        assert (vectors[:3] @ vectors[:3].T)[~np.eye(3, dtype=bool)].max() < 0.9

        models = {card["id"]: card["state"] for card in http.get("/v1/models").json()["data"]}
        assert models == {DEFAULT_MODEL_ID: "loaded", DEFAULT_EMBEDDINGS_ID: "loaded"}
        memory = http.get("/stats").json()["models"][DEFAULT_EMBEDDINGS_ID]["memory_bytes"]
        assert memory["rss"] < memory["estimate"]["total"]
