"""The continuous-batching scheduler, driven in-process on a tiny model (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from multiserve.engine.protocol import (
    Accepted,
    ChoiceDelta,
    Generate,
    Rejected,
    SamplingParams,
    TextPrompt,
)
from multiserve.engine.protocol import WorkerConfig as Config
from multiserve.engine.runtime import Runtime
from multiserve.engine.scheduler import Scheduler

STEP_TOKENS = 32


@pytest.fixture(scope="module")
def scheduler(tiny_model: Path):
    runtime = Runtime(
        Config(
            "tiny", tiny_model, n_ctx_per_seq=1024, n_seq_max=4, step_tokens=STEP_TOKENS, threads=1
        )
    )
    yield Scheduler(runtime)
    runtime.close()


def _generate(request_id: str, prompt: str, max_tokens: int, n: int = 1) -> Generate:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Generate(request_id, TextPrompt.completion(prompt), n, params)


def test_long_prompt_is_chunked_and_running_streams_keep_getting_tokens(scheduler) -> None:
    assert scheduler.submit(_generate("short", "hello", 40)) is None
    while not scheduler.running:  # the short request is decoding
        scheduler.step()
    assert scheduler.submit(_generate("long", "hello world " * 60, 5)) is None
    first_events = scheduler.step()
    accepted = [e for e in first_events if isinstance(e, Accepted)]
    assert [e.request_id for e in accepted] == ["long"]
    assert accepted[0].prompt_tokens > 3 * STEP_TOKENS

    steps_while_prefilling = 1
    while any(job.request_id == "long" for job in [*scheduler.waiting, *scheduler.prefilling]):
        events = scheduler.step()
        assert scheduler.batch.n_tokens <= STEP_TOKENS
        short = [e for e in events if isinstance(e, ChoiceDelta) and e.request_id == "short"]
        assert len(short) == 1  # one token for the running stream in every step
        steps_while_prefilling += 1
    assert steps_while_prefilling >= 3  # the prompt took several steps, never one giant batch
    while scheduler.has_work():
        scheduler.step()
    assert scheduler.idle_slots() == 4


def test_n_choices_share_the_prompt_and_release_every_slot(scheduler) -> None:
    scheduler.submit(_generate("multi", "the cat", 6, n=3))
    deltas: dict[int, int] = {}
    while scheduler.has_work():
        for event in scheduler.step():
            if isinstance(event, ChoiceDelta):
                deltas[event.index] = deltas.get(event.index, 0) + event.new_tokens
    assert deltas == {0: 6, 1: 6, 2: 6}
    assert scheduler.idle_slots() == 4


def test_requests_wait_for_free_slots_and_cancel_frees_them(scheduler) -> None:
    for i in range(6):
        scheduler.submit(_generate(f"r{i}", "hello", 1000))
    scheduler.step()
    assert len(scheduler.waiting) == 2  # 4 slots
    assert scheduler.counts() == (4, 2)
    for i in range(6):
        scheduler.cancel(f"r{i}")
    assert not scheduler.has_work()
    assert scheduler.idle_slots() == 4


def test_queue_timeout_refuses_without_running(scheduler) -> None:
    for i in range(4):
        scheduler.submit(_generate(f"busy{i}", "hello", 1000))
    late = _generate("late", "hello", 5)
    scheduler.submit(Generate(late.request_id, late.prompt, 1, late.params, queue_timeout=-1))
    events = scheduler.step()
    refused = [e for e in events if isinstance(e, Rejected)]
    assert [(e.request_id, e.timed_out) for e in refused] == [("late", True)]
    for i in range(4):
        scheduler.cancel(f"busy{i}")
    assert not scheduler.has_work()


def test_refusals_name_the_problem(scheduler) -> None:
    too_long = scheduler.submit(_generate("x", "hello", 5000))
    assert isinstance(too_long, Rejected)
    assert "1024" in too_long.message and "5000" in too_long.message
    too_many = scheduler.submit(_generate("y", "hello", 5, n=5))
    assert isinstance(too_many, Rejected) and too_many.param == "n"
    assert not scheduler.has_work()


def test_greedy_with_a_no_op_bias_picks_the_same_tokens(scheduler) -> None:
    """Plain greedy reads llama.cpp's logits in place; a logit bias of 0 sends the row through the
    override copy, which must not change the answer."""

    def run(params: SamplingParams) -> list[int]:
        scheduler.submit(Generate("g", TextPrompt.completion("the dog"), 1, params))
        tokens: list[int] = []
        while scheduler.has_work():
            scheduler.step()
            tokens += [c.next_token for c in scheduler.running]
        return tokens

    fast = run(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    chain = run(
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias=((5, 0.0),))
    )
    assert fast == chain
    assert len(fast) == 11  # the last token finishes the choice and leaves `running`
