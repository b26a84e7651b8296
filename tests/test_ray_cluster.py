"""The Ray backend on a local multi-node Ray cluster (simulated nodes with their own memory), with
tiny generated models and a real server started with `--ray`: placement by memory, eviction of
the least recently used model when no node has room, a model too large for every node, a file
missing on the nodes, and a node killed in the middle of a stream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from conftest import RunningServer, run_server
from multiserve.config import ModelSpec
from multiserve.fleet.gguf_header import read_header
from multiserve.fleet.memory import estimate_memory
from ray_cluster import local_cluster
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
        model_id: (stats["placement"] or {}).get("node_id") for model_id, stats in models.items()
    }


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("ray") / "tiny.gguf", seed=0, n_ctx_train=8192)


@pytest.fixture(scope="module")
def sized(model_file: Path) -> Iterator[tuple[RunningServer, list[str]]]:
    """Node A fits `small` but not `big`; node B fits `big` alone or `small` alone; `huge` fits
    neither. Yields the server and the two nodes' ids."""
    small, big = _estimate(model_file, SMALL), _estimate(model_file, BIG)
    assert big > 1.3 * small and _estimate(model_file, HUGE) > big + small
    memories = [(small + big) // 2, big + small // 2]
    config = model_file.parent / "sized.toml"
    config.write_text(
        _model("small", SMALL)
        + _model("small2", SMALL)
        + _model("big", BIG)
        + _model("huge", HUGE)
        + _model("absent", SMALL, path="no-such-file.gguf")
    )
    with (
        local_cluster(memories) as (cluster, nodes),
        run_server(["--config", str(config), "--ray", cluster.address], config.parent) as srv,
    ):
        yield srv, [node.node_id for node in nodes]


def test_models_go_to_the_node_they_fit_and_the_least_recent_makes_room(sized) -> None:
    server, (node_a, node_b) = sized
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
        small2 = http.get("/stats").json()["models"]["small2"]["placement"]
        assert cards["small2"]["node"] == small2["node"] and cards["big"]["node"] is None


def test_a_model_too_large_for_every_node_is_refused_naming_the_largest(sized) -> None:
    server, _ = sized
    with server.http() as http:
        reply = _complete(http, "huge")
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == "model_too_large"
    assert "more than any Ray node has: the largest offers" in error["message"]
    assert int(reply.headers["Retry-After"]) >= 1  # a larger node may join


def test_a_file_missing_on_the_nodes_says_where_it_must_be(sized) -> None:
    server, _ = sized
    with server.http() as http:
        reply = _complete(http, "absent")
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == "model_unavailable"
    assert "every node needs the GGUF file at the same path" in error["message"]
    assert "no-such-file" not in error["message"]  # no path reaches a client


@pytest.fixture
def two_nodes(model_file: Path) -> Iterator[tuple[RunningServer, object, list]]:
    config = model_file.parent / "two.toml"
    config.write_text(_model("first", BIG) + _model("second", SMALL))
    with (
        local_cluster([GiB, GiB]) as (cluster, nodes),
        run_server(["--config", str(config), "--ray", cluster.address], config.parent) as srv,
    ):
        yield srv, cluster, nodes


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
