"""Per-choice llama.cpp sampler chains and the log-probabilities OpenAI clients ask for."""

from __future__ import annotations

import llama_cpp as ll
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from multiserve.engine.protocol import SamplingParams, TokenLogprob, TopLogprob
from multiserve.engine.runtime import Runtime

PENALTY_WINDOW = 64  # tokens of history the repeat/frequency/presence penalties look at


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


# Logits divided by a vanishing temperature overflow float32 to inf (with logits near 100, below
# about 1e-36), and inf - inf is NaN: the chain could then pick a token the grammar forbids, and
# llama.cpp aborts the process. 1e-4 is a wide margin; such temperatures mean "take the likeliest
# token" anyway.
GREEDY_BELOW = 1e-4


class Sampler:
    """A llama.cpp sampler chain owned by one choice; `free` it when the choice ends."""

    def __init__(self, runtime: Runtime, params: SamplingParams, grammar: str | None, seed: int):
        self._argmax_only = False
        self._chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if params.logit_bias:
            self._bias = (ll.llama_logit_bias * len(params.logit_bias))()
            for slot, (token, bias) in zip(self._bias, params.logit_bias, strict=True):
                slot.token, slot.bias = token, bias
            self._add(
                ll.llama_sampler_init_logit_bias(runtime.n_vocab, len(self._bias), self._bias)
            )
        if grammar is not None:
            sampler = ll.llama_sampler_init_grammar(runtime.vocab, grammar.encode(), b"root")
            if not sampler:
                self.free()
                raise SamplingError(
                    "response_format schema gives an invalid grammar", "response_format"
                )
            self._add(sampler)
        if (params.repeat_penalty, params.frequency_penalty, params.presence_penalty) != (1, 0, 0):
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
            # plain greedy needs no chain: an argmax over llama.cpp's logits is ten times
            # cheaper than the chain copying all of a large vocabulary into candidates
            self._argmax_only = ll.llama_sampler_chain_n(self._chain) == 0
            self._add(ll.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            self._add(ll.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            self._add(ll.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            self._add(ll.llama_sampler_init_min_p(params.min_p, 1))
        self._add(ll.llama_sampler_init_temp(params.temperature))
        self._add(ll.llama_sampler_init_dist(seed))

    def _add(self, sampler: ll.llama_sampler_p) -> None:
        ll.llama_sampler_chain_add(self._chain, sampler)

    def sample(self, runtime: Runtime, batch_index: int) -> int:
        """Pick and accept the next token from the logits at `batch_index` of the last decode."""
        if self._argmax_only:
            return int(runtime.logits_view(batch_index).argmax())
        return ll.llama_sampler_sample(self._chain, runtime.ctx, batch_index)

    def free(self) -> None:
        if self._chain:
            ll.llama_sampler_free(self._chain)
            self._chain = None


def choice_seed(params: SamplingParams, index: int) -> int:
    """Each of `n` choices gets its own stream: reproducible with a seed, random without."""
    if params.seed is None:
        return ll.LLAMA_DEFAULT_SEED
    return (params.seed + index) % ll.LLAMA_DEFAULT_SEED


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
