"""Prefix reuse in the scheduler: every way a prompt can come from a cache gives the same answer.

Driven in-process (no server) on a tiny generated model and on the real default model, whose
sliding-window attention is the hard case. Each scenario is compared with the same request read
with `cache_prompt=False`, token for token.

llama.cpp's CPU kernels are not batch-invariant: the same prompt read in other chunks gives
logits that differ by up to about 0.8 on the default model (measured). The tiny model's F16
weights keep those differences far below any gap between its logits. The default-model prompts end
in counting after a long passage, where every next token leads by 4.5 or more, so rounding cannot
flip a token, while a wrong or partly dropped cache (a missing window, stale cells at reused
positions) breaks the count.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from multiserve.engine.prefix_cache import HostCache, SlotTable, common_prefix
from multiserve.engine.protocol import (
    ChoiceDelta,
    Generate,
    Prefilled,
    SamplingParams,
    TokenPrompt,
    WorkerConfig,
)
from multiserve.engine.runtime import Runtime
from multiserve.engine.scheduler import HOST_MIN_TOKENS, Scheduler
from multiserve.models.default import default_model_path

# -- the parts ---------------------------------------------------------------------------------


def test_common_prefix() -> None:
    a = np.array([1, 2, 3, 4], np.int32)
    assert common_prefix(a, np.array([1, 2, 9], np.int32)) == 2
    assert common_prefix(a, a[:2]) == 2
    assert common_prefix(a, np.array([], np.int32)) == 0
    assert common_prefix(a, np.array([7], np.int32)) == 0


def test_best_idle_slot_takes_the_longest_prefix_and_ties_go_to_the_least_recent() -> None:
    table = SlotTable(3, 16)
    for seq, (tokens, used) in enumerate([([1, 2, 3], 5.0), ([1, 2, 9], 1.0), ([1, 2], 3.0)]):
        table.slots[seq].set(np.array(tokens, np.int32))
        table.slots[seq].last_used = used
    assert table.best_idle(np.array([1, 2, 3, 4], np.int32)) == (table.slots[0], 3)
    slot, lcp = table.best_idle(np.array([1, 2, 7], np.int32))  # three slots share 2 tokens
    assert (slot.seq, lcp) == (1, 2)
    table.slots[1].busy = True
    assert table.best_idle(np.array([1, 2, 7], np.int32))[0].seq == 2


def test_host_cache_keeps_its_bound_drops_the_oldest_and_what_a_new_entry_extends() -> None:
    cache = HostCache(limit_bytes=100)
    cache.put(np.array([1, 2, 3], np.int32), bytearray(40))
    cache.put(np.array([5, 6], np.int32), bytearray(40))
    cache.put(np.array([1, 2, 3, 4], np.int32), bytearray(40))  # extends the first: replaces it
    assert len(cache) == 2 and cache.bytes == 80
    entry, lcp = cache.best(np.array([1, 2, 3, 4, 5], np.int32))
    assert lcp == 4 and len(entry.tokens) == 4
    cache.touch(cache.best(np.array([5, 6], np.int32))[0])
    cache.put(np.array([8], np.int32), bytearray(40))  # over the bound: the oldest goes
    assert cache.bytes <= 100
    assert cache.best(np.array([1, 2, 3, 4], np.int32))[0] is None
    assert cache.best(np.array([5, 6], np.int32))[1] == 2
    cache.put(np.array([9], np.int32), bytearray(101))  # larger than the bound: not kept
    assert cache.bytes <= 100 and cache.best(np.array([9], np.int32))[0] is None


# -- a scheduler driven by hand ------------------------------------------------------------------


@dataclass
class Result:
    text: list[str] = field(default_factory=list)
    cached: int | None = None
    choices: dict[int, list[str]] = field(default_factory=dict)


def _request(rid: str, prompt: list[int], max_tokens: int, cache: bool = True, n: int = 1):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Generate(rid, TokenPrompt(tuple(prompt)), n, params, cache_prompt=cache)


def _step(scheduler: Scheduler, results: dict[str, Result]) -> None:
    for event in scheduler.step():
        result = results.setdefault(event.request_id, Result())
        if isinstance(event, Prefilled):
            result.cached = event.cached_tokens
        elif isinstance(event, ChoiceDelta):
            result.choices.setdefault(event.index, []).append(event.text)
            if event.index == 0:
                result.text.append(event.text)


def _run(scheduler: Scheduler, *requests: Generate) -> dict[str, Result]:
    results: dict[str, Result] = {}
    for request in requests:
        assert scheduler.submit(request) is None
    while scheduler.has_work():
        _step(scheduler, results)
    return results


def _reference(scheduler: Scheduler, prompt: list[int], max_tokens: int) -> str:
    result = _run(scheduler, _request("reference", prompt, max_tokens, cache=False))["reference"]
    assert result.cached == 0
    return "".join(result.text)


def _forget_everything(scheduler: Scheduler) -> None:
    """Fill every slot with unrelated text, so nothing of earlier prompts stays in a slot."""
    n = len(scheduler.slots.slots)
    noise = [_request(f"noise{i}", [7 + i] * 40, 1) for i in range(n)]
    _run(scheduler, *noise)


class Scenarios:
    """The ways a prompt reaches a slot, each checked against the uncached answer."""

    def __init__(self, scheduler: Scheduler, prompt: list[int], max_tokens: int) -> None:
        self.scheduler = scheduler
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.expected = _reference(scheduler, prompt, max_tokens)

    def check(self, result: Result, least_cached: int) -> None:
        assert "".join(result.text) == self.expected
        assert result.cached is not None and result.cached >= least_cached

    def full_hit(self) -> None:
        _run(self.scheduler, _request("warm", self.prompt, 1))
        result = _run(self.scheduler, _request("hit", self.prompt, self.max_tokens))["hit"]
        self.check(result, len(self.prompt) - 1)

    def partial_hit(self) -> None:
        """The cached prompt branches off before the end (an edited last turn)."""
        cut = len(self.prompt) * 2 // 3
        other = self.prompt[:cut] + [3, 4, 5] * 10
        _run(self.scheduler, _request("branch", other, 4))
        result = _run(self.scheduler, _request("partial", self.prompt, self.max_tokens))
        self.check(result["partial"], cut)

    def copy_from_busy_slot(self) -> None:
        scheduler, results = self.scheduler, {}
        cut = len(self.prompt) - 20
        scheduler.submit(_request("busy", [*self.prompt[:cut], 9, 9, 9], 400))
        while not scheduler.running:
            _step(scheduler, results)
        scheduler.submit(_request("copy", self.prompt, self.max_tokens))
        while "copy" not in results or len(results["copy"].text) < self.max_tokens:
            _step(scheduler, results)
        scheduler.cancel("busy")
        self.check(results["copy"], cut)

    def concurrent_readers(self) -> None:
        """Two requests arrive together: the prompt is read once and shared."""
        _forget_everything(self.scheduler)
        first = _request("first", self.prompt, self.max_tokens)
        second = _request("second", self.prompt, self.max_tokens)
        results = _run(self.scheduler, first, second)
        assert "".join(results["first"].text) == self.expected
        self.check(results["second"], len(self.prompt) - 1)

    def from_host_memory(self) -> None:
        _run(self.scheduler, _request("saved", self.prompt, 1))
        _forget_everything(self.scheduler)
        assert self.scheduler.host_cache is not None and len(self.scheduler.host_cache) > 0
        result = _run(self.scheduler, _request("restored", self.prompt, self.max_tokens))
        self.check(result["restored"], len(self.prompt) - 1)

    def all(self) -> None:
        self.full_hit()
        self.partial_hit()
        self.copy_from_busy_slot()
        self.concurrent_readers()
        self.from_host_memory()


def _scheduler(path: Path, **config) -> Iterator[Scheduler]:
    settings = {
        "n_ctx_per_seq": 2048,
        "n_seq_max": 4,
        "step_tokens": 128,
        "threads": 2,
        "host_cache_bytes": 256 * 2**20,
        **config,
    }
    runtime = Runtime(WorkerConfig("m", path, **settings))
    yield Scheduler(runtime)
    runtime.close()


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> Iterator[Scheduler]:
    yield from _scheduler(tiny_model, threads=1)


def _tiny_prompt(seed: int, length: int = 600) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 300) for _ in range(length - 1)]


def test_tiny_model_gives_the_same_tokens_from_every_cache(tiny: Scheduler) -> None:
    Scenarios(tiny, _tiny_prompt(1), max_tokens=24).all()


def test_cancel_mid_prompt_leaves_what_was_read_reusable(tiny: Scheduler) -> None:
    prompt = _tiny_prompt(2)
    expected = _reference(tiny, prompt, 16)
    results: dict[str, Result] = {}
    tiny.submit(_request("cut", prompt, 16))
    _step(tiny, results)
    _step(tiny, results)  # two chunks of the prompt are read
    tiny.cancel("cut")
    result = _run(tiny, _request("again", prompt, 16))["again"]
    assert "".join(result.text) == expected
    assert result.cached == 2 * 128


def test_a_request_waiting_to_share_a_cancelled_prompt_reads_it_itself(tiny: Scheduler) -> None:
    prompt = _tiny_prompt(5)
    expected = _reference(tiny, prompt, 16)
    _forget_everything(tiny)
    results: dict[str, Result] = {}
    tiny.submit(_request("source", prompt, 16))
    tiny.submit(_request("follower", prompt, 16))
    _step(tiny, results)  # both admitted; the follower waits for the source's reading
    assert [j.request_id for j in tiny.prefilling if j.source is not None] == ["follower"]
    tiny.cancel("source")
    while tiny.has_work():
        _step(tiny, results)
    assert "".join(results["follower"].text) == expected
    assert results["follower"].cached == 0


def test_n_choices_after_a_cached_prefix_all_match(tiny: Scheduler) -> None:
    prompt = _tiny_prompt(3)
    expected = _reference(tiny, prompt, 16)
    _run(tiny, _request("warm", prompt, 1))
    result = _run(tiny, _request("three", prompt, 16, n=3))["three"]
    assert result.cached == len(prompt) - 1
    assert ["".join(result.choices[i]) for i in range(3)] == [expected] * 3
    again = _run(tiny, _request("after", prompt, 16))["after"]  # every fork left a sound cache
    assert "".join(again.text) == expected


def test_cache_prompt_false_neither_uses_nor_leaves_a_cache(tiny: Scheduler) -> None:
    prompt = _tiny_prompt(4, 300)
    _run(tiny, _request("warm", prompt, 1))
    first = _run(tiny, _request("private", prompt, 4, cache=False))["private"]
    assert first.cached == 0
    _forget_everything(tiny)
    assert tiny.host_cache is not None
    tiny.host_cache = HostCache(tiny.host_cache.limit_bytes)  # drop what earlier tests saved
    _run(tiny, _request("private2", prompt, 4, cache=False))
    assert _run(tiny, _request("next", prompt, 4))["next"].cached == 0


def test_host_cache_never_exceeds_its_bound(tiny_model: Path) -> None:
    for scheduler in _scheduler(tiny_model, threads=1, n_seq_max=2, host_cache_bytes=2**20):
        for i in range(12):
            _run(scheduler, _request(f"p{i}", _tiny_prompt(100 + i, HOST_MIN_TOKENS + 50), 1))
            assert scheduler.host_cache is not None
            assert scheduler.host_cache.bytes <= 2**20
        assert 0 < len(scheduler.host_cache) < 12  # it kept some, and dropped the oldest


# -- the default model: sliding-window attention ---------------------------------------------------


def _counting_prompt(runtime: Runtime, sentences: int, seed: int) -> list[int]:
    """A passage of random sentences, then counting the model goes on with."""
    rng = random.Random(seed)
    names = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
    passage = " ".join(
        f"{rng.choice(names)} has {rng.randrange(2, 99)} apples." for _ in range(sentences)
    )
    start = rng.randrange(100, 900)
    count = ", ".join(str(start + i) for i in range(30))
    text = f"{passage}\nNow we count: {count},"
    return runtime.tokenize(text, add_bos=True, parse_special=False).tolist()


@pytest.fixture(scope="module")
def gemma() -> Iterator[Scheduler]:
    yield from _scheduler(default_model_path())


def test_default_model_gives_the_same_tokens_from_every_cache(gemma: Scheduler) -> None:
    prompt = _counting_prompt(gemma.runtime, sentences=150, seed=1)
    assert len(prompt) > 2 * 512  # longer than the sliding window, twice
    Scenarios(gemma, prompt, max_tokens=16).all()


def test_a_dropped_window_is_never_reused() -> None:
    """Without a full-size sliding-window cache, a branch that ends where the window's cells are
    already gone is read again (and answered right); one whose window is intact is reused.

    One slot: its window cache holds 768 cells, so a 300-token answer after a ~600-token prompt
    pushes the oldest ~130 positions out, past the 512-token window behind the prompt's end.
    """
    for scheduler in _scheduler(
        default_model_path(), swa_full=False, host_cache_bytes=0, n_seq_max=1
    ):
        assert scheduler.runtime.swa_window == 512
        prompt = _counting_prompt(scheduler.runtime, sentences=70, seed=2)
        assert 550 < len(prompt) < 700
        expected = _reference(scheduler, prompt, 12)
        _run(scheduler, _request("long", prompt, 300))
        result = _run(scheduler, _request("branch", prompt, 12))["branch"]
        assert "".join(result.text) == expected
        assert result.cached == 0
        result = _run(scheduler, _request("again", prompt, 12))["again"]  # window intact
        assert "".join(result.text) == expected
        assert result.cached == len(prompt) - 1
