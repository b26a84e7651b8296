"""`"model": "auto"` end to end on tiny models: the expert answers and says so, the route header,
stickiness across turns, falling through a full queue, and where the router shows itself
(`/v1/models`, `/stats`, `/metrics`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import RunningServer, run_server
from test_fleet import LONG, Stream, _config, _model, _states, _wait_for
from tiny_gguf import write_tiny_model

ROUTER = """
[router]
default = "chat"

[[router.rules]]
name = "busy"
keywords = ["busy"]
model = ["narrow", "code"]
fallthrough = true

[[router.rules]]
name = "strict"
keywords = ["strict"]
model = ["narrow", "code"]

[[router.rules]]
name = "code"
patterns = ['\\w+\\(\\)']
model = "code"

[[router.rules]]
name = "tools"
tools = true
model = "code"

[[router.rules]]
name = "french"
languages = ["fr"]
model = "code"
"""


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("routing")
    write_tiny_model(folder / "tiny.gguf", seed=0, n_ctx_train=8192)
    models = (
        _model("chat", "tiny", n_ctx=512)
        + _model("code", "tiny", n_ctx=512)
        + _model("narrow", "tiny", n_ctx=8192, n_parallel=1, queue_limit=0)
    )
    config = _config(folder, models + ROUTER)
    with run_server(["--config", str(config)], folder) as server:
        yield server


def _chat(http: httpx.Client, *texts: str, **extra: object) -> httpx.Response:
    """A conversation: user turns, each answered (the answers made up) but the last."""
    messages: list[dict] = [{"role": "system", "content": "Be brief."}]
    for i, text in enumerate(texts):
        messages.append({"role": "user", "content": text})
        if i < len(texts) - 1:
            messages.append({"role": "assistant", "content": "Sure."})
    body = {"model": "auto", "messages": messages, "max_tokens": 2, **extra}
    return http.post("/v1/chat/completions", json=body)


def _route(response: httpx.Response) -> dict[str, str]:
    header = response.headers["x-multiserve-route"]
    return dict(part.split("=", 1) for part in header.split("; "))


def test_auto_answers_from_the_expert_and_says_why(routed: RunningServer) -> None:
    client: OpenAI = routed.openai
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "why does run() hang"}], max_tokens=2
    )
    assert raw.parse().model == "code"
    assert raw.headers["x-multiserve-route"] == "rule=code; model=code; reason=pattern 1 'run()'"
    plain = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hello there"}], max_tokens=2
    )
    assert plain.model == "chat"  # no rule: the default


def test_streams_and_text_completions_are_routed_too(routed: RunningServer) -> None:
    body = {"model": "auto", "prompt": "call main()", "max_tokens": 2, "stream": True}
    with routed.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert _route(response)["model"] == "code"
        chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks and all('"model": "code"' in c or '"model":"code"' in c for c in chunks)


def test_a_lone_surrogate_in_the_message_is_routed_not_an_error(routed: RunningServer) -> None:
    text = "\udc00 Bonjour, je voudrais une recette de crêpes"
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 2}
    headers = {"content-type": "application/json"}
    with routed.http() as http:  # json.dumps escapes the surrogate, as a JSON client may send it
        response = http.post("/v1/chat/completions", content=json.dumps(body), headers=headers)
    # routed by its language; the model then refuses the invalid text itself (400, as named)
    assert response.status_code == 400, response.text
    assert _route(response)["rule"] == "french"


def test_tools_route_by_what_the_request_needs(routed: RunningServer) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with routed.http() as http:
        response = _chat(http, "hello", tools=[tool], tool_choice="none")
        assert _route(response)["rule"] == "default"  # tools it may not call need none
        response = _chat(http, "hello again", tools=[tool])
        assert _route(response) == {"rule": "tools", "model": "code", "reason": "tools"}


def _cached(response: httpx.Response) -> int:
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_later_turns_stay_with_the_first_turns_model_and_its_cache(routed: RunningServer) -> None:
    with routed.http() as http:
        first = _chat(http, "Hi, a question about my garden")
        assert _route(first)["model"] == "chat"
        later = _chat(http, "Hi, a question about my garden", "and what about main()?")
        assert later.status_code == 200, later.text
        assert _route(later) == {
            "rule": "sticky",
            "model": "chat",
            "reason": "conversation placed by default",
        }
        assert later.json()["model"] == "chat"
        # the first turn's prompt is read from the cache, not again
        assert _cached(later) >= first.json()["usage"]["prompt_tokens"] - 4 > 0
        fresh = _chat(http, "A new chat", "and what about main()?")
        assert _route(fresh)["model"] == "code"


def test_a_full_queue_passes_to_the_next_target_only_where_the_rule_says(
    routed: RunningServer,
) -> None:
    holder = Stream(routed.url, {"model": "narrow", **LONG, "max_tokens": 8000})  # its one slot
    try:
        with routed.http() as http:
            _wait_for(lambda: http.get("/stats").json()["models"]["narrow"]["requests"]["running"])
            passed = _chat(http, "busy day")
            assert passed.status_code == 200, passed.text
            assert _route(passed) == {
                "rule": "busy",
                "model": "code",
                "reason": "keyword 'busy'",
                "passed": "narrow:queue_full",
            }
            refused = _chat(http, "strict day")
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "queue_full"
            assert refused.headers["Retry-After"]
            assert _route(refused) == {
                "rule": "strict",
                "model": "narrow",
                "reason": "keyword 'strict'",
            }
            router = http.get("/stats").json()["router"]
            assert router["passed_over"] >= 1
    finally:
        holder.close()
    with routed.http() as http:  # no place in any queue is left behind by a refusal

        def places() -> dict[str, int]:
            models = http.get("/stats").json()["models"]
            return {name: model["requests"]["in_system"] for name, model in models.items()}

        _wait_for(lambda: not any(places().values()), explain=places)


def test_auto_is_listed_and_is_not_a_model_to_load_or_embed_with(routed: RunningServer) -> None:
    with routed.http() as http:
        cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
        assert cards["auto"]["state"] == "router"
        assert cards["auto"]["routes_to"] == ["narrow", "code", "chat"]
        assert http.get("/v1/models/auto").json() == cards["auto"]
        for refused in (
            http.post("/v1/models/auto/load"),
            http.post("/v1/models/auto/unload"),
            http.post("/v1/embeddings", json={"model": "auto", "input": "x"}),
        ):
            assert refused.status_code == 400
            assert refused.json()["error"]["code"] == "not_a_model"


def test_stats_and_metrics_count_decisions_per_rule_and_model(routed: RunningServer) -> None:
    with routed.http() as http:
        before = http.get("/stats").json()["router"]["decisions"].get("code", {}).get("code", 0)
        for i in range(3):  # three conversations: none is a later turn of another
            assert _chat(http, f"what does go{i}() do").status_code == 200
        router = http.get("/stats").json()["router"]
        assert router["decisions"]["code"]["code"] == before + 3
        assert router["decision_seconds"]["count"] >= 3
        assert router["decision_seconds"]["p99"] < 0.05
        assert router["sticky_conversations"] >= 1
        metrics = http.get("/metrics").text
        assert 'multiserve:router_decisions_total{model_name="code",rule="code"}' in metrics
        assert "multiserve:router_decision_seconds_bucket" in metrics


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def test_an_image_reaches_a_model_that_says_it_cannot_read_it(routed: RunningServer) -> None:
    content = [{"type": "text", "text": "what is this?"}, IMAGE]
    body = {"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    with routed.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("images_not_supported", "messages")
    assert "does not read images" in error["message"]
    assert _route(response)["model"] == "chat"


def test_without_a_router_auto_is_an_unknown_model(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "tiny.gguf", seed=0)
    config = _config(tmp_path, _model("only", "tiny", n_ctx=256))
    with run_server(["--config", str(config)], tmp_path) as server, server.http() as http:
        response = _chat(http, "hello")
        assert response.status_code == 404
        assert "x-multiserve-route" not in response.headers
        assert "auto" not in {card["id"] for card in http.get("/v1/models").json()["data"]}
        # an image is refused before the model it names is loaded for nothing
        content = [{"type": "text", "text": "what is this?"}, IMAGE]
        body = {"model": "only", "messages": [{"role": "user", "content": content}]}
        refused = http.post("/v1/chat/completions", json=body)
        assert refused.json()["error"]["code"] == "images_not_supported"
        assert _states(http) == {"only": "unloaded"}


def test_auto_counts_against_the_rate_limit_once(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "tiny.gguf", seed=0)
    models = _model("a", "tiny", n_ctx=256) + _model("b", "tiny", n_ctx=256)
    router = '[router]\ndefault = "a"\n[[router.rules]]\nkeywords = ["x"]\nmodel = ["b", "a"]\n'
    settings = "threads = 1\nrequests_per_minute = 6\nrate_limit_burst = 2\n"  # 1 per 10 s
    config = _config(tmp_path, models + router, settings)
    with run_server(["--config", str(config)], tmp_path) as server, server.http() as http:
        assert _chat(http, "x one").status_code == 200
        assert _chat(http, "x two").status_code == 200  # the burst: two, not one
        limited = _chat(http, "x three")
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert _route(limited)["model"] == "b"
