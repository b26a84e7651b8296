"""Prefix reuse as clients see it: `usage.prompt_tokens_details.cached_tokens`, the per-request
opt-out, and the counters in /metrics and /stats, end to end with the official `openai` client,
on both backends (local workers, and the same config on a two-node Ray cluster)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import BACKENDS, RunningServer, on_each_backend


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[RunningServer]:
    yield from on_each_backend(request, server)


def _messages() -> list[dict]:
    """A conversation no earlier test sent (so nothing of it is cached yet)."""
    system = f"session {uuid.uuid4().hex}: " + "you answer briefly. " * 4
    return [{"role": "system", "content": system}, {"role": "user", "content": "hello there"}]


def test_a_repeated_prompt_reports_its_cached_tokens(server) -> None:
    client, messages = server.openai, _messages()
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    # at most the template's opening can be cached from earlier conversations
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens // 2
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    prompt = second.usage.prompt_tokens
    assert prompt == first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == prompt - 1  # the last is read


def test_a_stream_reports_cached_tokens_in_its_usage_chunk(server) -> None:
    client, messages = server.openai, _messages()
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_cache_prompt_false_opts_out(server) -> None:
    client, messages = server.openai, _messages()
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    private = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=1, extra_body={"cache_prompt": False}
    )
    assert private.usage.prompt_tokens_details.cached_tokens == 0


def _counter(text: str, name: str, model: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model_name") == model:
                return sample.value
    return 0.0


def test_metrics_and_stats_count_queried_and_hit_tokens(server) -> None:
    client, messages = server.openai, _messages()
    with server.http() as http:
        before_text = http.get("/metrics").text
        before = http.get("/stats").json()["models"]["tiny"]["prefix_cache"]
        replies = [
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
            for _ in range(2)
        ]
        after_text = http.get("/metrics").text
        after = http.get("/stats").json()["models"]["tiny"]["prefix_cache"]
    prompt = sum(r.usage.prompt_tokens for r in replies)
    cached = sum(r.usage.prompt_tokens_details.cached_tokens for r in replies)
    assert cached >= replies[1].usage.prompt_tokens - 1  # the repeat is a hit
    queries = "multiserve:prefix_cache_queries_total"
    hits = "multiserve:prefix_cache_hits_total"
    assert _counter(after_text, queries, "tiny") - _counter(before_text, queries, "tiny") == prompt
    assert _counter(after_text, hits, "tiny") - _counter(before_text, hits, "tiny") == cached
    assert after["queried_tokens"] - before["queried_tokens"] == prompt
    assert after["hit_tokens"] - before["hit_tokens"] == cached
    assert 0 < after["hit_rate"] <= 1
    assert after["host_limit_bytes"] > 0
    assert 0 <= after["host_bytes"] <= after["host_limit_bytes"]
