"""Batched native sampling: the exact distribution, llama.cpp's filter and penalty semantics, seeds.

Stratified uniforms make the distribution checks exact rather than statistical: with N draws at
u = (i + 0.5) / N, inverse-CDF sampling picks each token exactly round(N * p) times (give or take
one), so any error in the softmax, the temperature or a filter shows as a count off by more.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import llama_cpp as ll
import numpy as np
import pytest

from multiserve.engine import _sampler
from multiserve.engine.protocol import (
    ChoiceDelta,
    Generate,
    SamplingParams,
    TextPrompt,
    WorkerConfig,
)
from multiserve.engine.runtime import Runtime
from multiserve.engine.sampling import ChoiceSampler
from multiserve.engine.scheduler import Scheduler

DRAWS = 100_000


def _draw(
    logits: np.ndarray,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    overrides=None,
    draws=DRAWS,
):
    """Counts of each token over `draws` stratified draws from one row of logits."""
    n_vocab = len(logits)
    ids = np.asarray(list((overrides or {}).keys()), np.int32)
    values = np.asarray(list((overrides or {}).values()), np.float32)
    uniform = (np.arange(draws) + 0.5) / draws
    out = np.empty(draws, np.int32)

    def full(value, dtype):
        return np.full(draws, value, dtype)

    offsets = np.zeros(draws + 1, np.int32)
    if len(ids):  # every draw uses the same overrides: repeat them per row
        offsets = np.arange(draws + 1, dtype=np.int32) * len(ids)
        ids, values = np.tile(ids, draws), np.tile(values, draws)
    _sampler.sample(
        logits.astype(np.float32),
        n_vocab,
        full(0, np.int32),
        full(temperature, np.float32),
        full(top_k, np.int32),
        full(top_p, np.float32),
        full(min_p, np.float32),
        uniform,
        offsets,
        ids,
        values,
        out,
    )
    return np.bincount(out, minlength=n_vocab)


def _expected(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The chain's distribution, written plainly in float64: top_k, top_p and min_p on the
    untempered logits, then temperature."""
    x = logits.astype(np.float64)
    keep = np.ones(len(x), bool)
    order = np.argsort(-x, kind="stable")
    if top_k:
        keep &= x >= x[order[top_k - 1]]
    if top_p < 1.0:
        p = np.where(keep, np.exp(x - x.max()), 0.0)
        p /= p.sum()
        cumulative = np.cumsum(p[order])
        last = int(np.searchsorted(cumulative, top_p))
        keep &= x >= x[order[last]]
    if min_p:
        keep &= x >= x.max() + np.log(min_p)
    w = np.where(keep, np.exp((x - x.max()) / temperature), 0.0)
    return w / w.sum()


LOGITS = np.random.default_rng(7).standard_normal(200).astype(np.float32) * 3.0


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"temperature": 0.5},
        {"temperature": 1.7},
        {"top_k": 12},
        {"top_p": 0.8},
        {"min_p": 0.05},
        {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.02},
    ],
    ids=repr,
)
def test_draws_follow_the_exact_distribution(settings: dict) -> None:
    counts = _draw(LOGITS, **settings)
    expected = _expected(LOGITS, **settings) * DRAWS
    assert np.abs(counts - expected).max() <= 2  # stratified draws: off by rounding only


def test_a_full_vocabulary_row_is_sampled_exactly() -> None:
    """262,144 logits (Gemma 3's vocabulary): the block sums must not lose any token's mass."""
    logits = np.random.default_rng(3).standard_normal(262_144).astype(np.float32) * 4.0
    logits[[5, 70_000, 262_143]] = [14.0, 13.0, 12.5]  # a few likely tokens across blocks
    counts = _draw(logits, draws=10_000)
    expected = _expected(logits) * 10_000
    assert np.abs(counts - expected).max() <= 2


def test_greedy_takes_the_argmax_including_overrides() -> None:
    counts = _draw(LOGITS, temperature=0.0)
    assert counts[LOGITS.argmax()] == DRAWS
    counts = _draw(LOGITS, temperature=0.0, overrides={3: 100.0})
    assert counts[3] == DRAWS


def _llama_chain_logits(logits: np.ndarray, params: SamplingParams, history: list[int]):
    """The logits after llama.cpp's own logit_bias and penalties samplers."""
    n_vocab = len(logits)
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    bias = (ll.llama_logit_bias * len(params.logit_bias))()
    for slot, (token, value) in zip(bias, params.logit_bias, strict=True):
        slot.token, slot.bias = token, value
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_logit_bias(n_vocab, len(bias), bias))
    ll.llama_sampler_chain_add(
        chain,
        ll.llama_sampler_init_penalties(
            n_vocab,
            64,
            params.repeat_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        ),
    )
    for token in history:
        ll.llama_sampler_accept(chain, token)
    data = (ll.llama_token_data * n_vocab)()
    for i, value in enumerate(logits):
        data[i].id, data[i].logit, data[i].p = i, float(value), 0.0
    array = ll.llama_token_data_array(data, n_vocab, -1, False)
    ll.llama_sampler_apply(chain, ctypes.byref(array))
    ll.llama_sampler_free(chain)
    return np.array([data[i].logit for i in range(n_vocab)], np.float32)


def test_bias_and_penalties_change_the_logits_as_llama_cpp_does() -> None:
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal(300) * 4).astype(np.float32)
    params = SamplingParams(
        repeat_penalty=1.3,
        frequency_penalty=0.4,
        presence_penalty=0.7,
        logit_bias=((5, 3.0), (6, -2.5), (7, 1.0)),
    )
    sampler = ChoiceSampler(params, seed=1, guard=None)
    history = [int(t) for t in rng.integers(0, 20, size=90)]  # more than the 64-token window
    sampler.history.extend(history)
    ours = logits.copy()
    for token, value in sampler.overrides(logits).items():
        ours[token] = value
    assert np.allclose(ours, _llama_chain_logits(logits, params, history), atol=1e-5)


# -- in a running scheduler ------------------------------------------------------------------


@pytest.fixture(scope="module")
def scheduler(tiny_model: Path):
    runtime = Runtime(
        WorkerConfig("tiny", tiny_model, n_ctx_per_seq=512, n_seq_max=8, step_tokens=64, threads=1)
    )
    yield Scheduler(runtime)
    runtime.close()


def _run(scheduler: Scheduler, requests: list[Generate]) -> dict[str, list[str]]:
    for request in requests:
        assert scheduler.submit(request) is None
    texts: dict[str, list[str]] = {r.request_id: [] for r in requests}
    while scheduler.has_work():
        for event in scheduler.step():
            if isinstance(event, ChoiceDelta):
                texts[event.request_id].append(event.text)
    return texts


def _sampled(request_id: str, prompt: str, seed: int | None) -> Generate:
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=40, ignore_eos=True)
    return Generate(request_id, TextPrompt.completion(prompt), 1, params, cache_prompt=False)


def test_a_seeded_request_samples_the_same_alone_and_among_seven_others(scheduler) -> None:
    alone = _run(scheduler, [_sampled("alone", "the cat and the dog", 1234)])["alone"]
    crowd = [_sampled("seeded", "the cat and the dog", 1234)]
    crowd += [_sampled(f"other{i}", f"hello world {i} " * (i + 1), None) for i in range(7)]
    together = _run(scheduler, crowd)
    assert together["seeded"] == alone
    assert len({"".join(t) for t in together.values()}) > 1  # the others really sampled


def test_different_seeds_give_different_text(scheduler) -> None:
    texts = _run(scheduler, [_sampled(f"s{seed}", "the cat", seed) for seed in range(4)])
    assert len({"".join(t) for t in texts.values()}) == 4


_DEAD_END = """
import sys
from pathlib import Path
from multiserve.engine import scheduler as scheduling
from multiserve.engine.protocol import ChoiceDelta, Generate, SamplingParams, TextPrompt
from multiserve.engine.protocol import WorkerConfig
from multiserve.engine.runtime import Runtime
from multiserve.engine.sampling import GrammarSpec

# "a", then a NUL character: llama.cpp offers no token for NUL, so no token continues the grammar
scheduling.grammar_spec = lambda runtime, params: GrammarSpec('root ::= "a" [\\\\x00]')
runtime = Runtime(WorkerConfig("tiny", Path(sys.argv[1]), 256, 1, 32, 1))
scheduler = scheduling.Scheduler(runtime)
params = SamplingParams(temperature=0.0, max_tokens=6, json_schema="")
scheduler.submit(Generate("g", TextPrompt.completion("the cat"), 1, params, cache_prompt=False))
deltas = []
while scheduler.has_work():
    deltas += [e for e in scheduler.step() if isinstance(e, ChoiceDelta)]
print(repr("".join(d.text for d in deltas)), deltas[-1].finish_reason)
"""


def test_a_grammar_no_token_can_continue_ends_the_choice_not_the_process(tiny_model: Path):
    """llama.cpp aborts the whole process when its grammar sampler is handed a token the grammar
    refuses; with nothing left to allow, the choice ends instead (its own process here, since
    the failure would be an abort)."""
    done = subprocess.run(
        [sys.executable, "-c", _DEAD_END, str(tiny_model)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["'a'", "stop"]
