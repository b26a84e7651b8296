"""Routing between replicas (backends/affinity.py) and placing them on nodes (the Ray backend's
`place`), on made-up nodes: no cluster needed."""

from __future__ import annotations

from pathlib import Path

from multiserve.backends.affinity import Prompt, ReplicaRouter
from multiserve.backends.client import Placement, Reservation
from multiserve.backends.ray_cluster import RayBackend, RayNode
from multiserve.config import ModelSpec, Settings
from multiserve.engine.protocol import Generate, SamplingParams, TextPrompt, TokenPrompt

GiB = 1 << 30
SYSTEM = "You are a careful assistant who answers in one sentence. "


def _request(text: str) -> Generate:
    return Generate("r", TextPrompt.completion(text), 1, SamplingParams())


def test_a_conversation_returns_to_the_replica_that_read_its_start() -> None:
    router = ReplicaRouter(slack=2)
    first = router.pick(_request(SYSTEM + "What is a cache?"), [0, 0])
    other = router.pick(_request("A different opening that shares nothing at all."), [0, 0])
    assert other != first  # ties alternate
    later = _request(SYSTEM + "What is a cache? A store. And a prefix?")
    assert router.pick(later, [1, 0]) == first  # its prefix, within the slack


def test_load_beats_affinity_beyond_the_slack_and_a_dead_replica_is_never_picked() -> None:
    router = ReplicaRouter(slack=2)
    turn = SYSTEM + "first"
    home = router.pick(_request(turn), [0, 0])
    loads: list[int | None] = [0, 0]
    loads[home] = 2  # two more than the other: within the slack, the next turn goes home
    assert router.pick(_request(turn + " second"), loads) == home
    loads[home] = 3  # three more: past the slack of two
    assert router.pick(_request(turn + " second third"), loads) != home
    loads = [0, 0]
    loads[home] = None  # its replica died
    assert router.pick(_request(turn + " second third fourth"), loads) != home


def test_a_shared_system_prompt_does_not_pull_new_conversations_to_one_replica() -> None:
    router = ReplicaRouter(slack=2)
    shared = SYSTEM * 3  # most of each first turn, but only part of any earlier prompt
    ask = " is my question."
    assert router.pick(_request(shared + "One" + ask), [0, 0]) == 0
    assert router.pick(_request(shared + "Two" + ask), [1, 0]) == 1  # not to the busier
    assert router.pick(_request(shared + "Six" + ask), [0, 1]) == 0  # both hold it now


def test_a_replica_that_died_holds_nothing_any_more() -> None:
    router = ReplicaRouter(slack=2)
    turn = SYSTEM + "a question"
    home = router.pick(_request(turn), [0, 0])
    loads = [0, 0]
    loads[home] = 1  # busier by one: within the slack, so the next turn goes home
    assert router.pick(_request(turn + " and an answer"), loads) == home
    router.forget(home)
    assert router.pick(_request(turn + " and an answer, then more"), loads) != home


def test_prefix_keys_follow_the_prompt_block_by_block() -> None:
    short, longer = Prompt.of(_request("x" * 70)).keys, Prompt.of(_request("x" * 110)).keys
    assert len(short) == 2 and longer[:2] == short and len(longer) == 3
    assert Prompt.of(_request("x" * 30)).keys == []  # no whole block yet (with its marker)
    tokens = Generate("r", TokenPrompt(tuple(range(20))), 1, SamplingParams())
    assert len(Prompt.of(tokens).keys) == 2  # every 8 tokens


def _backend(*nodes: tuple[str, int, int]) -> RayBackend:
    backend = RayBackend(Settings(ray_address="127.0.0.1:1"))
    backend._nodes = [RayNode(Placement(name, name), memory, cpus) for name, memory, cpus in nodes]
    return backend


def _spec(**fields: object) -> ModelSpec:
    return ModelSpec(id="m", path=Path("m.gguf"), **fields)


def test_replicas_go_to_distinct_nodes_with_the_most_memory_free() -> None:
    backend = _backend(("a", 4 * GiB, 8), ("b", 8 * GiB, 8), ("c", 6 * GiB, 8))
    held = [Reservation((Placement("b", "b"),), 5 * GiB, 4)]
    place = backend.place(_spec(replicas=2, threads=2), 2 * GiB, held)
    assert place is not None
    assert [p.node for p in place.placements] == ["c", "a"]  # b has 3 GiB free now
    assert backend.place(_spec(replicas=3, threads=2), 4 * GiB, held) is None  # b lacks room


def test_threads_are_reserved_like_memory_and_default_to_the_whole_node() -> None:
    backend = _backend(("a", 8 * GiB, 4))
    whole = backend.place(_spec(), GiB, [])
    assert whole is not None and whole.threads == 4
    assert backend.place(_spec(), GiB, [whole]) is None  # no CPU left
    assert backend.place(_spec(threads=2), GiB, []) is not None


def test_a_node_whose_actor_died_is_passed_over_for_a_while() -> None:
    backend = _backend(("a", 8 * GiB, 4), ("b", 4 * GiB, 4))
    backend.suspect(Placement("a", "a"))
    place = backend.place(_spec(), GiB, [])
    assert place is not None and place.placements[0].node == "b"


def test_too_large_names_the_largest_node_or_the_missing_replicas() -> None:
    backend = _backend(("a", 8 * GiB, 4), ("b", 4 * GiB, 4))
    assert "the largest offers 8.0 GiB" in backend.too_large(_spec(), 9 * GiB)
    assert "only 1 Ray nodes have that much" in backend.too_large(_spec(replicas=2), 6 * GiB)
    assert backend.too_large(_spec(replicas=2), 3 * GiB) is None
