"""Picking every choice's next token after a decode step, and the log-probabilities asked for.

All of a step's choices are sampled together by one native call (`_sampler.c`) that reads
llama.cpp's logits in place: exact sampling from the full distribution at about the cost of an
argmax, where llama.cpp's per-sequence sampler chain copied the whole vocabulary for every choice
(on Gemma 3's 262,144 tokens that was a quarter of a decode step at 8 streams). Only choices held
to a JSON grammar keep a llama.cpp chain, since the grammar sampler lives there.

Semantics are the chain's: logit_bias, then repeat/frequency/presence penalties over the last
`PENALTY_WINDOW` generated tokens, then top_k, top_p and min_p on the untempered logits, then
temperature. Each choice draws from its own random stream, seeded by the request's `seed`, so a
seeded request samples the same tokens alone or among other requests.
"""

from __future__ import annotations

import ctypes
from collections import Counter, deque

import llama_cpp as ll
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from multiserve.engine import _sampler
from multiserve.engine.protocol import SamplingParams, TokenLogprob, TopLogprob
from multiserve.engine.runtime import Runtime

PENALTY_WINDOW = 64  # tokens of history the repeat/frequency/presence penalties look at

# Logits divided by a vanishing temperature overflow float32 to inf (with logits near 100, below
# about 1e-36), and inf - inf is NaN: a sampler could then pick a token the grammar forbids, and
# llama.cpp aborts the process. 1e-4 is a wide margin; such temperatures mean "take the likeliest
# token" anyway.
GREEDY_BELOW = 1e-4


class SamplingError(ValueError):
    """Sampling parameters llama.cpp refuses (e.g. a JSON schema it cannot turn into a grammar)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def grammar_for(json_schema: str) -> str:
    """GBNF for a JSON schema (llama-cpp-python's converter); "" means any JSON object."""
    if json_schema == "":
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(json_schema)
    except Exception as exc:  # the converter also signals bad schemas with bare asserts
        raise SamplingError(
            f"response_format json_schema cannot be enforced: {exc}", "response_format"
        ) from None


def choice_seed(params: SamplingParams, index: int) -> int | None:
    """Each of `n` choices gets its own stream: reproducible with a seed, random without."""
    if params.seed is None:
        return None
    return (params.seed + index) % ll.LLAMA_DEFAULT_SEED


class ChoiceSampler:
    """What one choice needs to pick its tokens: parameters, random stream, recent tokens."""

    def __init__(self, params: SamplingParams, seed: int | None, chain: GrammarChain | None):
        self.params = params
        self.grammar_chain = chain
        self.rng = np.random.default_rng(seed)
        self.history: deque[int] = deque(maxlen=PENALTY_WINDOW)
        self.greedy = params.temperature < GREEDY_BELOW
        self.bias = dict(params.logit_bias)

    def overrides(self, logits: np.ndarray) -> dict[int, float]:
        """The logits this choice's bias and penalties change, with their new values."""
        values = {token: float(logits[token]) + bias for token, bias in self.bias.items()}
        if self.params.penalised and self.history:
            params = self.params
            for token, count in Counter(self.history).items():
                value = values.get(token, float(logits[token]))
                if value <= 0:
                    value *= params.repeat_penalty
                else:
                    value /= params.repeat_penalty
                values[token] = value - count * params.frequency_penalty - params.presence_penalty
        return values

    def free(self) -> None:
        if self.grammar_chain is not None:
            self.grammar_chain.free()
            self.grammar_chain = None


class GrammarChain:
    """A llama.cpp sampler chain for a choice held to a grammar; `free` it when the choice ends."""

    def __init__(self, runtime: Runtime, params: SamplingParams, grammar: str, seed: int | None):
        self._chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if params.logit_bias:
            self._bias = (ll.llama_logit_bias * len(params.logit_bias))()
            for slot, (token, bias) in zip(self._bias, params.logit_bias, strict=True):
                slot.token, slot.bias = token, bias
            self._add(
                ll.llama_sampler_init_logit_bias(runtime.n_vocab, len(self._bias), self._bias)
            )
        sampler = ll.llama_sampler_init_grammar(runtime.vocab, grammar.encode(), b"root")
        if not sampler:
            self.free()
            raise SamplingError(
                "response_format schema gives an invalid grammar", "response_format"
            )
        self._add(sampler)
        if params.penalised:
            self._add(
                ll.llama_sampler_init_penalties(
                    runtime.n_vocab,
                    PENALTY_WINDOW,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.temperature < GREEDY_BELOW:
            self._add(ll.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            self._add(ll.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            self._add(ll.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            self._add(ll.llama_sampler_init_min_p(params.min_p, 1))
        self._add(ll.llama_sampler_init_temp(params.temperature))
        self._add(ll.llama_sampler_init_dist(ll.LLAMA_DEFAULT_SEED if seed is None else seed))

    def _add(self, sampler: ll.llama_sampler_p) -> None:
        ll.llama_sampler_chain_add(self._chain, sampler)

    def sample(self, runtime: Runtime, batch_index: int) -> int:
        """Pick and accept the next token from the logits at `batch_index` of the last decode."""
        return ll.llama_sampler_sample(self._chain, runtime.ctx, batch_index)

    def free(self) -> None:
        if self._chain:
            ll.llama_sampler_free(self._chain)
            self._chain = None


def make_sampler(
    runtime: Runtime, params: SamplingParams, grammar: str | None, index: int
) -> ChoiceSampler:
    seed = choice_seed(params, index)
    chain = GrammarChain(runtime, params, grammar, seed) if grammar is not None else None
    return ChoiceSampler(params, seed, chain)


_FLOAT_SIZE = ctypes.sizeof(ctypes.c_float)


def sample_step(runtime: Runtime, items: list[tuple[ChoiceSampler, int]]) -> list[int]:
    """The next token of each (choice, batch index) whose logits the last decode produced."""
    tokens = [0] * len(items)
    native = [i for i, (sampler, _) in enumerate(items) if sampler.grammar_chain is None]
    for i, (sampler, index) in enumerate(items):
        if sampler.grammar_chain is not None:
            tokens[i] = sampler.grammar_chain.sample(runtime, index)
    if native:
        for i, token in zip(
            native, _sample_native(runtime, [items[i] for i in native]), strict=True
        ):
            tokens[i] = token
            items[i][0].history.append(token)
    return tokens


def _sample_native(runtime: Runtime, items: list[tuple[ChoiceSampler, int]]) -> list[int]:
    n_vocab = runtime.n_vocab
    base = ctypes.cast(ll.llama_get_logits(runtime.ctx), ctypes.c_void_p).value
    rows = np.empty(len(items), np.int32)
    temperature = np.empty(len(items), np.float32)
    top_k = np.empty(len(items), np.int32)
    top_p = np.empty(len(items), np.float32)
    min_p = np.empty(len(items), np.float32)
    uniform = np.empty(len(items), np.float64)
    offsets = np.zeros(len(items) + 1, np.int32)
    ids: list[int] = []
    values: list[float] = []
    for i, (sampler, index) in enumerate(items):
        address = ctypes.cast(ll.llama_get_logits_ith(runtime.ctx, index), ctypes.c_void_p).value
        rows[i] = (address - base) // (_FLOAT_SIZE * n_vocab)
        params = sampler.params
        temperature[i] = 0.0 if sampler.greedy else params.temperature
        top_k[i], top_p[i], min_p[i] = params.top_k, params.top_p, params.min_p
        uniform[i] = 0.0 if sampler.greedy else sampler.rng.random()
        if sampler.bias or (params.penalised and sampler.history):
            changed = sampler.overrides(runtime.logits_view(index))
            ids += changed.keys()
            values += changed.values()
        offsets[i + 1] = len(ids)
    n_outputs = int(rows.max()) + 1
    logits = np.ctypeslib.as_array(ll.llama_get_logits(runtime.ctx), shape=(n_outputs * n_vocab,))
    out = np.empty(len(items), np.int32)
    _sampler.sample(
        logits,
        n_vocab,
        rows,
        temperature,
        top_k,
        top_p,
        min_p,
        uniform,
        offsets,
        np.asarray(ids, np.int32),
        np.asarray(values, np.float32),
        out,
    )
    return out.tolist()


def token_logprob(runtime: Runtime, logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """Log-probability of `token` and the `top` likeliest alternatives, from raw logits."""
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    alternatives: tuple[TopLogprob, ...] = ()
    if top > 0:
        best = np.argpartition(-logprobs, top - 1)[:top]
        best = best[np.argsort(-logprobs[best])]
        alternatives = tuple(_top(runtime, int(t), float(logprobs[t])) for t in best)
    piece = runtime.piece(token)
    return TokenLogprob(
        token=piece.decode("utf-8", errors="replace"),
        bytes=tuple(piece),
        logprob=float(logprobs[token]),
        top=alternatives,
    )


def _top(runtime: Runtime, token: int, logprob: float) -> TopLogprob:
    piece = runtime.piece(token)
    return TopLogprob(piece.decode("utf-8", errors="replace"), tuple(piece), logprob)
