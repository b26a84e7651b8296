"""The Ray backend on a local multi-node Ray cluster (simulated nodes with their own memory), with
tiny generated models and a real server started with `--ray`: placement by memory, eviction of
the least recently used model when no node has room, a model too large for every node, a file
missing on the nodes, and a node killed in the middle of a stream."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from conftest import RunningServer, run_server
from multiserve.backends.ray_local import local_cluster
from multiserve.config import ModelSpec
from multiserve.fleet.gguf_header import read_header
from multiserve.fleet.memory import estimate_memory
from tiny_gguf import write_tiny_model

GiB = 1 << 30
SMALL = {"n_ctx": 256, "n_parallel": 4}
BIG = {"n_ctx": 8192, "n_parallel": 16}
HUGE = {"n_ctx": 8192, "n_parallel": 64}


def _model(model_id: str, shape: dict, path: str = "tiny.gguf") -> str:
    fields = "\n".join(f"{key} = {value}" for key, value in shape.items())
    return f'[[models]]\nid = "{model_id}"\npath = "{path}"\nthreads = 1\n{fields}\n'


def _estimate(path: Path, shape: dict) -> int:
    return estimate_memory(read_header(path), ModelSpec(id="m", path=path, **shape)).total


def _complete(http: httpx.Client, model: str, **body: object) -> httpx.Response:
    return http.post(
        "/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 4, **body}
    )


def _placements(http: httpx.Client) -> dict[str, str | None]:
    """Each loaded model's node id (None for models not holding memory)."""
    models = http.get("/stats").json()["models"]
    return {
        model_id: stats["replicas"][0]["node_id"] if stats["replicas"] else None
        for model_id, stats in models.items()
    }


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@contextlib.contextmanager
def _on_cluster(
    config: Path, models: str, memories: list[int]
) -> Iterator[tuple[RunningServer, object, list]]:
    """A server for `models` (config text, written to `config`) on a fresh simulated cluster
    with a node of each of `memories` bytes; yields the server, the cluster and its nodes."""
    config.write_text(models)
    with (
        local_cluster(memories) as (cluster, nodes),
        run_server(["--config", str(config), "--ray", cluster.address], config.parent) as srv,
    ):
        yield srv, cluster, nodes


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("ray") / "tiny.gguf", seed=0, n_ctx_train=8192)


@pytest.fixture(scope="module")
def sized(model_file: Path) -> Iterator[tuple[RunningServer, list[str], str]]:
    """Node A fits `small` but not `big`; node B fits `big` alone or `small` alone; `huge` fits
    neither. Yields the server, the two nodes' ids and the cluster's address."""
    small, big = _estimate(model_file, SMALL), _estimate(model_file, BIG)
    assert big > 1.3 * small and _estimate(model_file, HUGE) > big + small
    models = (
        _model("small", SMALL)
        + _model("small2", SMALL)
        + _model("big", BIG)
        + _model("huge", HUGE)
        + _model("absent", SMALL, path="no-such-file.gguf")
    )
    memories = [(small + big) // 2, big + small // 2]
    with _on_cluster(model_file.parent / "sized.toml", models, memories) as (srv, cluster, nodes):
        yield srv, [node.node_id for node in nodes], cluster.address


def test_models_go_to_the_node_they_fit_and_the_least_recent_makes_room(sized) -> None:
    server, (node_a, node_b), _ = sized
    with server.http() as http:
        assert _complete(http, "big").status_code == 200
        assert _placements(http)["big"] == node_b  # the only node big enough
        assert _complete(http, "small").status_code == 200
        assert _placements(http)["small"] == node_a  # the node with more memory free
        stats = http.get("/stats").json()["memory"]["nodes"]
        assert {n["node_id"]: n["reserved"] > 0 for n in stats} == {node_a: True, node_b: True}

        time.sleep(1.2)  # both idle past the grace of a client's pause between requests
        assert _complete(http, "small2").status_code == 200  # no room anywhere: evict the LRU
        placed = _placements(http)
        assert placed["big"] is None and placed["small2"] == node_b and placed["small"] == node_a
        cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
        assert cards["small2"]["state"] == "loaded" and cards["big"]["state"] == "unloaded"
        small2 = http.get("/stats").json()["models"]["small2"]["replicas"]
        assert cards["small2"]["replicas"] == [{"node": small2[0]["node"], "state": "loaded"}]
        assert cards["big"]["replicas"] == []


@pytest.mark.parametrize(
    ("model", "code", "says"),
    [
        # a larger node may join: 503 with Retry-After, naming the largest node there is
        ("huge", "model_too_large", "more than any Ray node has: the largest offers"),
        # the path rule, never the path itself
        ("absent", "model_unavailable", "every node needs the GGUF file at the same path"),
    ],
)
def test_a_model_no_node_can_load_is_refused_saying_why(sized, model, code, says) -> None:
    server, _, _ = sized
    with server.http() as http:
        reply = _complete(http, model)
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert (error["code"], says in error["message"]) == (code, True), error
    assert int(reply.headers["Retry-After"]) >= 1
    assert "no-such-file" not in error["message"]


@pytest.fixture
def two_nodes(model_file: Path) -> Iterator[tuple[RunningServer, object, list]]:
    models = _model("first", BIG) + _model("second", SMALL)
    with _on_cluster(model_file.parent / "two.toml", models, [GiB, GiB]) as running:
        yield running


def test_a_node_killed_mid_stream_fails_the_stream_and_the_model_moves(two_nodes) -> None:
    server, cluster, nodes = two_nodes
    with server.http() as http:
        assert _complete(http, "first").status_code == 200
        assert _complete(http, "second").status_code == 200
        placed = _placements(http)
        assert placed["first"] != placed["second"]  # spread over the two nodes
        doomed = next(node for node in nodes if node.node_id == placed["first"])

        stream = server.openai.completions.create(
            model="first",
            prompt="hello",
            max_tokens=8000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)
        cluster.remove_node(doomed, allow_graceful=False)
        killed = time.monotonic()
        with pytest.raises(openai.APIError) as failure:
            for _ in chunks:
                pass
        assert "stopped unexpectedly" in str(failure.value)
        assert time.monotonic() - killed < 20  # failed by the node's death, never a hang

        assert _complete(http, "second").status_code == 200  # the other model kept serving
        _wait_for(lambda: _complete(http, "first").status_code == 200)
        survivor = next(node.node_id for node in nodes if node is not doomed)
        assert _placements(http) == {"first": survivor, "second": survivor}


@pytest.fixture(scope="module")
def replicated(model_file: Path) -> Iterator[tuple[RunningServer, object, list]]:
    """`hot` with two replicas on three nodes (the third takes a lost replica)."""
    models = _model("hot", {"n_ctx": 1024, "n_parallel": 4, "replicas": 2})
    with _on_cluster(model_file.parent / "replicated.toml", models, [GiB] * 3) as running:
        yield running


def test_a_crashed_worker_leaves_no_actor_holding_its_node(sized) -> None:
    server, _, address = sized
    with server.http() as http:
        assert _complete(http, "small").status_code == 200
        (replica,) = http.get("/stats").json()["models"]["small"]["replicas"]
        os.kill(replica["worker_pid"], signal.SIGKILL)  # the simulated nodes share this machine
        _wait_for(lambda: http.get("/v1/models/small").json()["state"] == "failed")
        _wait_for(lambda: _complete(http, "small").status_code == 200)  # placed again
    rows = [line for line in _models_listing(address) if " small " in line]
    assert len(rows) == 1, rows  # the crashed worker's actor is gone, not left holding memory
    # (ended by the client; Ray would also end it once no handle is left, if none were kept)


def _models_listing(address: str) -> list[str]:
    listing = subprocess.run(
        [sys.executable, "-m", "multiserve", "models", "--ray", address],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert listing.returncode == 0, listing.stderr
    return listing.stdout.splitlines()


def _replicas(http: httpx.Client) -> list[dict]:
    return http.get("/stats").json()["models"]["hot"]["replicas"]


def test_replicas_share_conversations_and_each_returns_to_its_cache(replicated) -> None:
    server, _, nodes = replicated
    with server.http() as http:
        # three conversations, so taking turns alone would send a later turn elsewhere
        prompts = [f"conversation {i} opens with a question about topic {i}: " for i in range(3)]
        cached = []
        for turn in range(3):
            for i, prompt in enumerate(prompts):
                reply = _complete(http, "hot", prompt=prompt, max_tokens=4)
                assert reply.status_code == 200, reply.text
                body = reply.json()
                if turn:
                    cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
                prompts[i] = f"{prompt}{body['choices'][0]['text']} and then, turn {turn}: "
        replicas = _replicas(http)
    assert len({r["node_id"] for r in replicas} & {node.node_id for node in nodes}) == 2
    assert sorted(r["requests"] for r in replicas) == [3, 6]  # one conversation, and two
    assert all(tokens > 0 for tokens in cached), cached  # every later turn found its prefix


def test_models_command_lists_each_replica_on_its_node(replicated) -> None:
    server, cluster, _ = replicated
    with server.http() as http:
        assert _complete(http, "hot").status_code == 200
        nodes = {r["node"] for r in _replicas(http)}
    rows = [line for line in _models_listing(cluster.address) if " hot " in line]
    assert len(rows) == 2 and {n for n in nodes for row in rows if n in row} == nodes


def test_a_lost_replica_fails_only_its_requests_and_the_other_serves(replicated) -> None:
    server, cluster, nodes = replicated
    with server.http() as http:
        assert _complete(http, "hot").status_code == 200
        first, second = _replicas(http)
        streams = [
            server.openai.completions.create(
                model="hot",
                prompt=f"stream {i} reads a long enough prompt to be its own",
                max_tokens=900,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for i in range(2)
        ]
        chunks = [iter(stream) for stream in streams]
        for stream in chunks:
            next(stream)
        by_node = {r["node_id"]: r["in_flight"] for r in _replicas(http)}
        assert by_node == {first["node_id"]: 1, second["node_id"]: 1}  # one on each
        cluster.remove_node(next(n for n in nodes if n.node_id == first["node_id"]), False)

        ended = []
        for stream in chunks:
            try:
                for _ in stream:
                    pass
                ended.append("complete")
            except openai.APIError as exc:
                assert "stopped unexpectedly" in str(exc)
                ended.append("failed")
        assert sorted(ended) == ["complete", "failed"]
        assert http.get("/v1/models/hot").json()["state"] == "loaded"
        for _ in range(3):  # new requests go to the replica left
            assert _complete(http, "hot").status_code == 200

        def placed_again() -> bool:  # on the third node, the lost one not among them
            states = {r["node_id"]: r["state"] for r in _replicas(http)}
            return list(states.values()) == ["loaded", "loaded"] and first["node_id"] not in states

        _wait_for(placed_again)
        assert second["node_id"] in {r["node_id"] for r in _replicas(http)}
