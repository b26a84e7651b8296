"""/health, /v1/models, /stats and /metrics say what the server is doing."""

from __future__ import annotations


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


def test_prometheus_metrics_use_vllm_style_names(server) -> None:
    with server.http() as http:
        http.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True},
        )
        text = http.get("/metrics").text
    for name in (
        "multiserve:time_to_first_token_seconds_bucket",
        "multiserve:inter_token_latency_seconds_bucket",
        "multiserve:e2e_request_latency_seconds_count",
        "multiserve:num_requests_running",
        "multiserve:num_requests_waiting",
        "multiserve:prompt_tokens_total",
        "multiserve:generation_tokens_total",
        "multiserve:request_success_total",
    ):
        assert name in text, name
    assert 'model_name="tiny"' in text
