"""POST /v1/embeddings through a real server and the official client: shapes, order, pooling,
normalisation, base64, `dimensions`, batching, refusals, metrics and the memory budget.

The embedding models here run with flash attention off: llama.cpp's tiled flash-attention kernel
sums a sequence's cells in tiles that depend on where its cells lie among the other inputs' (up
to ~1e-4 of drift on this model), while without it an input's vector is the same bit for bit
whatever is batched beside it, so packing, ordering or masking errors cannot hide in a tolerance.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import llama_cpp as ll
import numpy as np
import pytest
from openai import BadRequestError, OpenAI

from conftest import BACKENDS, RunningServer, run_server, serving_on
from multiserve.config import ModelSpec
from multiserve.engine.embedder import Embedder
from multiserve.engine.protocol import Embed, Embedded
from multiserve.engine.runtime import Batch, Runtime, context_params
from multiserve.fleet.manager import worker_config
from test_fleet import _config, _model, _states, _stats, _wait_for
from test_observability import _metrics
from tiny_gguf import BOS_ID, TOKEN_TO_ID, write_tiny_model

N_EMBD = 64  # the tiny model's embedding size
HELLO, WORLD, CAT = (TOKEN_TO_ID[f"\u2581{word}"] for word in ("hello", "world", "cat"))
WORDS = ("hello", "world", "the", "cat", "dog", "red", "blue", "good", "day", "model")

# every model takes one thread: on a Ray node, a model without `threads` would take all its CPUs
EMBEDDING = 'path = "tiny.gguf"\nembedding = true\nflash_attn = false\nthreads = 1\n'
CONFIG = f"""threads = 1

[[models]]
id = "chat"
path = "tiny.gguf"
n_ctx = 256
n_parallel = 2
step_tokens = 64
threads = 1
embeddings_model = "embed"

[[models]]
id = "plain-chat"
path = "tiny.gguf"
n_ctx = 256
n_parallel = 2
step_tokens = 64
threads = 1

[[models]]
id = "embed"
aliases = ["embed-alias"]
{EMBEDDING}n_ctx = 64
step_tokens = 128
n_parallel = 8

[[models]]
id = "own-cls"
path = "tiny-cls.gguf"
embedding = true
flash_attn = false
normalize = false
threads = 1
""" + "".join(
    f'\n[[models]]\nid = "raw-{pooling}"\n{EMBEDDING}pooling = "{pooling}"\nnormalize = false\n'
    for pooling in ("mean", "cls", "last")
)


@pytest.fixture(scope="module", params=BACKENDS)
def embed_server(
    request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """Every model, on local workers and on a two-node Ray cluster (vectors cross the worker's
    own TCP connection)."""
    folder = tmp_path_factory.mktemp("embeddings")
    (folder / "tiny.gguf").symlink_to(tiny_model)
    # the same weights, with the pooling an embedding model names in its GGUF (2: cls)
    write_tiny_model(folder / "tiny-cls.gguf", seed=0, n_ctx_train=8192, pooling_type=2)
    config = folder / "multiserve.toml"
    config.write_text(CONFIG)
    with serving_on(request.param, config) as server:
        yield server


@pytest.fixture(scope="module")
def client(embed_server: RunningServer) -> OpenAI:
    return embed_server.openai


@pytest.fixture(scope="module")
def http(embed_server: RunningServer) -> Iterator[httpx.Client]:
    with embed_server.http() as client:
        yield client


def _vectors(client: OpenAI, model: str, inputs: object, **extra: object) -> np.ndarray:
    reply = client.embeddings.create(model=model, input=inputs, **extra)
    assert [item.index for item in reply.data] == list(range(len(reply.data)))
    return np.array([item.embedding for item in reply.data])


def _texts(count: int) -> list[str]:
    """Texts of 1 to 40 words, no two alike."""
    return [
        " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(1 + i * 3 % 40))
        for i in range(count)
    ]


def _error(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_shapes_order_usage_and_unit_length(client: OpenAI) -> None:
    texts = _texts(5)
    reply = client.embeddings.create(model="embed", input=texts)
    assert reply.object == "list" and reply.model == "embed"
    assert [(item.object, item.index) for item in reply.data] == [
        ("embedding", i) for i in range(5)
    ]
    vectors = np.array([item.embedding for item in reply.data])
    assert vectors.shape == (5, N_EMBD)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # in the order asked: each row is its own text's vector (all five differ)
    alone = np.array([_vectors(client, "embed", text)[0] for text in texts])
    assert np.abs(vectors - alone).max() <= 1e-4
    assert min(np.abs(a - b).max() for i, a in enumerate(alone) for b in alone[i + 1 :]) > 0.01
    one = client.embeddings.create(model="embed", input="hello world")
    assert one.usage.prompt_tokens == one.usage.total_tokens == 3  # <s> hello world
    tokens = sum(
        client.embeddings.create(model="embed", input=t).usage.prompt_tokens for t in texts
    )
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens


def test_batch_equals_one_by_one(client: OpenAI) -> None:
    """30 inputs take several steps of at most 8 inputs and 128 tokens, mixed with a request
    sent at the same time; each vector is the one its input gets alone."""
    texts = _texts(30)
    batch = _vectors(client, "embed", texts)
    alone = np.array([_vectors(client, "embed", text)[0] for text in texts])
    assert np.abs(batch - alone).max() <= 1e-4


def test_token_arrays_equal_text(client: OpenAI) -> None:
    text = _vectors(client, "embed", ["hello world", "cat"])
    tokens = _vectors(client, "embed", [[BOS_ID, HELLO, WORLD], [BOS_ID, CAT]])
    assert np.abs(text - tokens).max() <= 1e-6
    single = _vectors(client, "embed", [BOS_ID, HELLO, WORLD])  # one input as a list of ids
    assert single.shape == (1, N_EMBD) and np.abs(single[0] - text[0]).max() <= 1e-6


def test_pooling_of_a_causal_model(client: OpenAI) -> None:
    """Token i's vector depends on tokens up to i only, so with a b: cls is a's vector alone,
    last is b's, and the mean is their average."""
    inputs = [[HELLO], [HELLO, CAT]]
    mean_a, mean_ab = _vectors(client, "raw-mean", inputs)
    cls_a, cls_ab = _vectors(client, "raw-cls", inputs)
    last_a, last_ab = _vectors(client, "raw-last", inputs)
    assert np.abs(np.array([cls_a, cls_ab, last_a]) - mean_a).max() <= 1e-6
    assert np.abs(last_ab - (2 * mean_ab - mean_a)).max() <= 1e-5
    assert np.abs(last_ab - mean_a).max() > 0.01  # b's vector is not a's
    assert abs(np.linalg.norm(mean_ab) - 1) > 0.01  # normalize = false: raw vectors
    normalized = _vectors(client, "embed", inputs)
    assert np.abs(normalized[1] - mean_ab / np.linalg.norm(mean_ab)).max() <= 1e-6


def test_a_model_without_pooling_in_the_config_pools_as_its_gguf_says(client: OpenAI) -> None:
    """bge-style models name CLS pooling in their GGUF: mean pooling would give other vectors."""
    inputs = [[HELLO, CAT, WORLD]]
    own = _vectors(client, "own-cls", inputs)
    assert np.abs(own - _vectors(client, "raw-cls", inputs)).max() <= 1e-6
    assert np.abs(own - _vectors(client, "raw-mean", inputs)).max() > 0.01


def test_base64_is_the_float_vectors_little_endian(client: OpenAI, http: httpx.Client) -> None:
    body = {"model": "embed", "input": ["hello world", "red dog"]}
    floats = http.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    packed = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    assert packed["usage"] == floats["usage"]
    for as_float, as_base64 in zip(floats["data"], packed["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(as_base64["embedding"]), dtype="<f4")
        assert decoded.tolist() == as_float["embedding"]  # float32 values, exactly
    # the official client asks for base64 by default and decodes it the same
    assert _vectors(client, "embed", body["input"]).tolist() == [
        item["embedding"] for item in floats["data"]
    ]


def test_dimensions_truncate_then_renormalise(client: OpenAI, http: httpx.Client) -> None:
    full = _vectors(client, "embed", "good day")[0]
    short = _vectors(client, "embed", "good day", dimensions=16)[0]
    assert short.shape == (16,)
    assert np.abs(short - full[:16] / np.linalg.norm(full[:16])).max() <= 1e-6
    too_many = _error(
        http.post("/v1/embeddings", json={"model": "embed", "input": "a", "dimensions": N_EMBD + 1})
    )
    assert (too_many["param"], too_many["code"]) == ("dimensions", "dimensions_too_large")
    assert str(N_EMBD) in too_many["message"]
    zero = _error(
        http.post("/v1/embeddings", json={"model": "embed", "input": "a", "dimensions": 0})
    )
    assert zero["param"] == "dimensions"


def test_inputs_that_cannot_be_embedded_are_400_naming_their_index(http: httpx.Client) -> None:
    def refusal(inputs: object) -> dict:
        return _error(http.post("/v1/embeddings", json={"model": "embed", "input": inputs}))

    long = refusal(["hello", "cat", " ".join(["hello"] * 80)])
    assert (long["param"], long["code"]) == ("input", "context_length_exceeded")
    assert "input[2] has 81 tokens" in long["message"] and "64" in long["message"]
    empty = refusal(["hello", ""])
    assert empty["param"] == "input" and "input[1] is empty" in empty["message"]
    assert refusal([])["param"] == "input"
    outside = refusal([[BOS_ID, HELLO], [HELLO, 99_999]])
    assert (outside["param"], outside["code"]) == ("input", "token_out_of_vocabulary")
    assert "input[1]" in outside["message"] and "99999" in outside["message"]
    too_many = refusal(["a"] * 2049)
    assert too_many["param"] == "input" and "2048" in too_many["message"]


def test_each_kind_of_model_answers_only_its_own_route(client: OpenAI, http: httpx.Client) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for model in ("embed", "embed-alias"):
        error = _error(http.post("/v1/chat/completions", json={"model": model, **chat}))
        assert (error["param"], error["code"]) == ("model", "wrong_model_type")
        assert "/v1/embeddings" in error["message"]
    error = _error(http.post("/v1/completions", json={"model": "embed", "prompt": "hi"}))
    assert error["code"] == "wrong_model_type"
    with pytest.raises(BadRequestError) as refused:
        client.embeddings.create(model="plain-chat", input="hi")
    assert refused.value.code == "wrong_model_type" and "embedding" in refused.value.message
    # a chat model with an embeddings_model answers embeddings through it, under its own name
    reply = client.embeddings.create(model="chat", input=["hello world", "cat"])
    assert reply.model == "chat"
    assert (
        np.array([d.embedding for d in reply.data]).tolist()
        == _vectors(client, "embed-alias", ["hello world", "cat"]).tolist()
    )
    assert http.post("/v1/chat/completions", json={"model": "chat", **chat}).status_code == 200


def test_embeddings_are_counted_under_the_embedding_model(
    client: OpenAI, http: httpx.Client
) -> None:
    def counted() -> tuple[float, float, int]:
        samples = _metrics(http)
        label = frozenset({("model_name", "embed")})
        stats = http.get("/stats").json()["models"]["embed"]
        return (
            samples.get(("multiserve:embedding_inputs_total", label), 0.0),
            samples.get(("multiserve:prompt_tokens_total", label), 0.0),
            stats["requests"]["inputs_embedded"],
        )

    before = counted()
    reply = client.embeddings.create(model="chat", input=_texts(3))
    after = counted()
    tokens = reply.usage.prompt_tokens
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (3, tokens, 3)
    stats = http.get("/stats").json()["models"]["embed"]
    assert stats["prefix_cache"] is None and stats["memory_bytes"]["estimate"]["host_cache"] == 0


def test_an_embedding_model_is_loaded_and_evicted_under_the_memory_budget(
    tiny_model: Path, tmp_path: Path
) -> None:
    (tmp_path / "a.gguf").symlink_to(tiny_model)
    models = _model("a") + _model("e", file="a", n_ctx=64, embedding=True)
    settings = 'threads = 1\nmemory_budget = "140MiB"\nmodel_turn = 0\n'  # room for one
    config = _config(tmp_path, models, settings)
    with run_server(["--config", str(config)], tmp_path) as server, server.http() as http:
        completion = {"model": "a", "prompt": "hi", "max_tokens": 2}
        embedding = {"model": "e", "input": ["hello", "world"]}
        assert http.post("/v1/completions", json=completion).status_code == 200
        assert _states(http) == {"a": "loaded", "e": "unloaded"}
        assert http.post("/v1/embeddings", json=embedding).status_code == 200
        assert _states(http) == {"a": "unloaded", "e": "loaded"}
        estimate = _stats(http, "e")["memory_bytes"]["estimate"]
        assert 0 < estimate["kv_cache"] < estimate["compute"] < estimate["total"]
        memory = http.get("/stats").json()["memory"]
        assert memory["reserved"] == estimate["total"] <= memory["budget"]
        assert http.post("/v1/completions", json=completion).status_code == 200
        _wait_for(lambda: _states(http) == {"a": "loaded", "e": "unloaded"})


def test_vectors_are_llama_cpps_own_pooling_without_the_vocabulary_projection(
    tiny_model: Path,
) -> None:
    """In the worker, a generative model's graph stops at the per-token vectors and they are
    pooled here: the vectors are those of llama.cpp's own pooling over the whole graph, and the
    logits of the step were never computed."""
    inputs = [[BOS_ID, HELLO, WORLD], [BOS_ID, CAT], [HELLO, CAT, HELLO, WORLD]]
    spec = ModelSpec(id="e", path=tiny_model, embedding=True, n_ctx=64, flash_attn=False)
    config = worker_config(spec, threads=1)
    runtime = Runtime(config)
    try:
        embedder = Embedder(runtime)
        embedder.enqueue(embedder.prepare(Embed("r", tuple(map(tuple, inputs)))))
        (reply,) = embedder.step()
        assert isinstance(reply, Embedded)
        skipped = runtime.logits(0)

        params = context_params(config)
        params.pooling_type = ll.LLAMA_POOLING_TYPE_MEAN
        whole = ll.llama_init_from_model(runtime.model, params)
        batch = Batch(config.step_tokens)
        try:
            for seq, tokens in enumerate(inputs):
                for pos, token in enumerate(tokens):
                    batch.add(token, pos, seq, True)
            assert ll.llama_decode(whole, batch.c_batch) == 0
            pooled = np.array(
                [
                    np.ctypeslib.as_array(ll.llama_get_embeddings_seq(whole, seq), shape=(N_EMBD,))
                    for seq in range(len(inputs))
                ]
            )
            computed = np.ctypeslib.as_array(
                ll.llama_get_logits_ith(whole, 0), shape=(runtime.n_vocab,)
            )
            assert np.abs(computed).max() > 0.1
            assert np.abs(skipped - computed).max() > 0.1
        finally:
            ll.llama_free(whole)
            batch.free()
    finally:
        runtime.close()
    assert (
        np.abs(reply.vectors - pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).max() <= 1e-6
    )
