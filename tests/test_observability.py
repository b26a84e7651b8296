"""/health, /v1/models, /stats and /metrics say what the server is doing."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tiny_gguf import TOKEN_TO_ID

HELLO = TOKEN_TO_ID["\u2581hello"]
Sample = tuple[str, frozenset[tuple[str, str]]]  # a sample's name and labels


def test_models_lists_every_configured_model_with_state(server) -> None:
    with server.http() as http:
        http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
        data = http.get("/v1/models").json()
    assert data["object"] == "list"
    cards = {card["id"]: card for card in data["data"]}
    assert set(cards) == {"tiny", "tiny-q8", "tiny-2slots"}
    assert cards["tiny"]["state"] == "loaded"
    assert cards["tiny"]["aliases"] == ["tiny-alias"]
    assert server.openai.models.retrieve("tiny-alias").id == "tiny"


def test_health(server) -> None:
    with server.http() as http:
        body = http.get("/health").json()
    assert body["status"] == "ok"
    assert set(body["models"]) == {"tiny", "tiny-q8", "tiny-2slots"}


def test_stats_count_requests_tokens_and_latency(server) -> None:
    with server.http() as http:
        before = http.get("/stats").json()["models"]["tiny"]
        http.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "hi", "max_tokens": 4, "ignore_eos": True},
        )
        after = http.get("/stats").json()["models"]["tiny"]
    assert after["requests"]["succeeded"] == before["requests"]["succeeded"] + 1
    assert after["tokens"]["generated"] == before["tokens"]["generated"] + 4
    latency = after["latency_seconds"]
    assert latency["time_to_first_token"]["count"] >= 1
    assert latency["end_to_end"]["p50"] >= latency["time_to_first_token"]["p50"] > 0


def _metrics(http: httpx.Client) -> dict[Sample, float]:
    """Every sample of /metrics, by sample name and labels."""
    text = http.get("/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _tiny(name: str, **labels: str) -> Sample:
    return f"multiserve:{name}", frozenset({"model_name": "tiny", **labels}.items())


def _forced_completion(http: httpx.Client, max_tokens: int, stream: bool) -> dict:
    """Usage of a completion whose every token is " hello" (so each one is delivered as text)."""
    body = {
        "model": "tiny",
        "prompt": "the cat",
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": {str(HELLO): 100},
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    if not stream:
        reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]
    with http.stream("POST", "/v1/completions", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line[6:7] == "{"]
    return events[-1]["usage"]


def test_prometheus_metrics_count_known_traffic(server) -> None:
    """After K requests of exactly M tokens and one refused request, /metrics says exactly that.

    Values are deltas over this test's own traffic, as the server is shared; nothing else is in
    flight on model "tiny" while it runs.
    """
    k, m = 3, 5
    with server.http() as http:
        assert http.get("/stats").json()["models"]["tiny"]["requests"]["in_flight"] == 0
        before = _metrics(http)
        usages = [_forced_completion(http, m, stream=i % 2 == 1) for i in range(k)]
        too_long = {"model": "tiny", "prompt": "hi", "max_tokens": 10_000}  # n_ctx is 256
        refused = http.post("/v1/completions", json=too_long)
        after = _metrics(http)
    assert refused.status_code == 400, refused.text
    assert [u["completion_tokens"] for u in usages] == [m] * k
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)

    expected = {  # how much each sample of model "tiny" grows
        _tiny("generation_tokens_total"): k * m,
        _tiny("prompt_tokens_total"): prompt_tokens,
        _tiny("prefix_cache_queries_total"): prompt_tokens,
        _tiny("request_success_total", finished_reason="length"): k,
        _tiny("request_failure_total", kind="rejected"): 1,
        # one first token and one end per request, one gap between each two of its m tokens
        _tiny("time_to_first_token_seconds_count"): k,
        _tiny("e2e_request_latency_seconds_count"): k,
        _tiny("e2e_request_latency_seconds_bucket", le="+Inf"): k,
        _tiny("inter_token_latency_seconds_count"): k * (m - 1),
    }
    grown = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in expected}
    assert grown == expected
    latency = _tiny("e2e_request_latency_seconds_sum")
    assert after[latency] > before.get(latency, 0.0)
    assert after[_tiny("num_requests_running")] == after[_tiny("num_requests_waiting")] == 0
