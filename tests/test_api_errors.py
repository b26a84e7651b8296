"""Bad requests get OpenAI error bodies with the right status, and the server keeps serving; on
both backends (local workers, and the same config on a two-node Ray cluster)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest

from conftest import BACKENDS, RunningServer, on_each_backend

LEAKS = re.compile(r"\.py\b|site-packages|(^|[\s\"'])/(usr|home|root|tmp|work|opt|etc|var)/")

GOOD_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[RunningServer]:
    yield from on_each_backend(request, server)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    assert not LEAKS.search(response.text), response.text
    return body["error"]


@pytest.fixture
def http(server):
    with server.http() as client:
        yield client
        # after every bad request, a good one still succeeds
        assert client.post("/v1/chat/completions", json=GOOD_CHAT).status_code == 200


def test_unknown_model_is_404_and_never_served_by_another(http) -> None:
    error = _error(http.post("/v1/chat/completions", json={**GOOD_CHAT, "model": "gpt-4"}), 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-4" in error["message"]


def test_prompt_plus_max_tokens_beyond_context_gives_both_numbers(http) -> None:
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 1000}
    error = _error(http.post("/v1/completions", json=body), 400)
    assert "256" in error["message"]  # the context
    assert "1000" in error["message"]  # what was asked
    assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")


def test_n_beyond_the_models_slots_is_400(http) -> None:
    # n choices run side by side, one sequence each: never more than the model's slots
    body = {"model": "tiny-2slots", "prompt": "hi", "max_tokens": 2, "n": 3}
    error = _error(http.post("/v1/completions", json=body), 400)
    assert (error["param"], error["code"]) == ("n", "n_too_large")
    assert "2" in error["message"]


def test_each_choice_must_fit_the_context(http) -> None:
    # each of the n sequences holds the prompt plus its own max_tokens
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 255, "n": 2}  # 3 + 255 > 256
    error = _error(http.post("/v1/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded"


def test_prompt_alone_beyond_context(http) -> None:
    body = {"model": "tiny", "prompt": "hello " * 400, "max_tokens": 1}
    error = _error(http.post("/v1/completions", json=body), 400)
    assert "256" in error["message"]


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"[1, 2]", b"42", b"null", b""],
    ids=["broken", "array", "number", "null", "empty"],
)
def test_body_that_is_not_a_json_object_is_400(http, payload: bytes) -> None:
    response = http.post(
        "/v1/chat/completions", content=payload, headers={"content-type": "application/json"}
    )
    _error(response, 400)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": "many"}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": 9}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"repeat_penalty": 5e-324}, "repeat_penalty"),  # zero in float32: NaN logits
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}] * 4097}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"stop": ["x"] * 50}, "stop"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_invalid_parameter_is_400_naming_it(http, change: dict, param: str) -> None:
    error = _error(http.post("/v1/chat/completions", json={**GOOD_CHAT, **change}), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_missing_model_names_it(http) -> None:
    error = _error(http.post("/v1/chat/completions", json={"messages": GOOD_CHAT["messages"]}), 400)
    assert error["param"] == "model"


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [TOOL["function"]]),
        ("function_call", {"name": "f"}),
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("reasoning_effort", "low"),
    ],
)
def test_openai_field_that_would_change_the_answer_is_refused_by_name(
    http, field: str, value: object
) -> None:
    error = _error(http.post("/v1/chat/completions", json={**GOOD_CHAT, field: value}), 400)
    assert error["param"] == field or field in error["message"]
    assert "not supported" in error["message"]


@pytest.mark.parametrize(
    ("field", "value"), [("echo", True), ("best_of", 2), ("suffix", " and so on")]
)
def test_completion_field_that_would_change_the_answer_is_refused(
    http, field: str, value: object
) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, field: value}
    error = _error(http.post("/v1/completions", json=body), 400)
    assert error["param"] == field
    assert "not supported" in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("POST", "/v1/responses", "unsupported_route"),
        ("POST", "/v1/moderations", "unsupported_route"),
        ("POST", "/v1/audio/transcriptions", "unsupported_route"),
        ("GET", "/v1/files", "unsupported_route"),
        ("GET", "/v2/whatever", "unknown_route"),
    ],
)
def test_missing_route_is_an_openai_404_naming_it(http, method: str, path: str, code: str) -> None:
    error = _error(http.request(method, path, json={}), 404)
    assert error["code"] == code
    assert f"{method} {path}" in error["message"]


def test_unknown_field_is_refused(http) -> None:
    error = _error(http.post("/v1/chat/completions", json={**GOOD_CHAT, "frobnicate": 1}), 400)
    assert "frobnicate" in error["message"]


def test_logit_bias_outside_vocabulary(http) -> None:
    body = {**GOOD_CHAT, "logit_bias": {"99999999": 5}}
    error = _error(http.post("/v1/chat/completions", json=body), 400)
    assert (error["param"], error["code"]) == ("logit_bias", "token_out_of_vocabulary")


def test_token_prompt_outside_vocabulary(http) -> None:
    body = {"model": "tiny", "prompt": [1, 10**7], "max_tokens": 1}
    error = _error(http.post("/v1/completions", json=body), 400)
    assert (error["param"], error["code"]) == ("prompt", "token_out_of_vocabulary")


def test_empty_prompt(http) -> None:
    _error(http.post("/v1/completions", json={"model": "tiny", "prompt": ""}), 400)


def test_unenforceable_schema_is_400(http) -> None:
    body = {
        **GOOD_CHAT,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"$ref": "#/definitions/missing"}},
        },
    }
    error = _error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "response_format"


def test_streaming_request_errors_before_streaming(http) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 5000, "stream": True}
    _error(http.post("/v1/completions", json=body), 400)


def test_unknown_route_and_method(http) -> None:
    _error(http.get("/v1/nothing"), 404)
    _error(http.get("/v1/chat/completions"), 405)
    # model ids may hold '/', but GET .../unload is a wrong method, not a model "tiny/unload"
    for method in ("GET", "PUT", "DELETE"):
        refused = http.request(method, "/v1/models/tiny/unload")
        _error(refused, 405)
        assert refused.headers["allow"] == "POST"


def test_remote_schema_ref_is_refused_not_fetched(http) -> None:
    schema = {"$ref": "https://example.invalid/schema.json"}
    body = {
        **GOOD_CHAT,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    error = _error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"].startswith("response_format")
    assert "$ref" in error["message"]


def test_wrong_content_type_is_400(http) -> None:
    response = http.post(
        "/v1/chat/completions",
        content=json.dumps(GOOD_CHAT),
        headers={"content-type": "text/plain"},
    )
    assert response.status_code in (400, 415)
    _error(response, response.status_code)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400(http, literal: str) -> None:
    raw = json.dumps({**GOOD_CHAT, "temperature": 0.5}).replace("0.5", literal)
    response = http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert _error(response, 400)["param"] == "temperature"


def test_message_that_is_not_an_object_is_400(http) -> None:
    body = {**GOOD_CHAT, "messages": ["hello"]}
    assert _error(http.post("/v1/chat/completions", json=body), 400)["param"] == "messages[0]"


@pytest.mark.parametrize("depth", [40, 5000])
def test_pathologically_nested_schema_is_refused_quickly(http, depth: int) -> None:
    schema = '{"type": "array", "items": ' * depth + '{"type": "string"}' + "}" * depth
    response_format = '{"type": "json_schema", "json_schema": {"name": "d", "schema": ' + schema
    raw = json.dumps({**GOOD_CHAT, "response_format": "F"}).replace('"F"', response_format + "}}")
    started = time.monotonic()
    response = http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert time.monotonic() - started < 2
    _error(response, 400)
