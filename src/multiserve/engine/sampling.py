"""Picking every choice's next token after a decode step, and the log-probabilities asked for.

All of a step's choices are sampled together by one native call (`_sampler.c`) that reads
llama.cpp's logits in place: exact sampling from the full distribution at about the cost of an
argmax, where llama.cpp's per-sequence sampler chain copied the whole vocabulary for every choice
(on Gemma 3's 262,144 tokens that was a quarter of a decode step at 8 streams). A choice held to
a grammar (JSON output, tool calls) also consults llama.cpp's grammar sampler (`GrammarGuard`).

Semantics are the chain's: logit_bias, then repeat/frequency/presence penalties over the last
`PENALTY_WINDOW` generated tokens, then top_k, top_p and min_p on the untempered logits, then
temperature. Each choice draws from its own random stream, seeded by the request's `seed`, so a
seeded request samples the same tokens alone or among other requests.
"""

from __future__ import annotations

import ctypes
import json
from collections import Counter, deque
from dataclasses import dataclass

import llama_cpp as ll
import numpy as np

from multiserve.engine import _sampler
from multiserve.engine.json_grammar import (
    ANY_JSON_OBJECT,
    SchemaNotEnforceable,
    json_schema_grammar,
)
from multiserve.engine.protocol import SamplingParams, TokenLogprob, TopLogprob
from multiserve.engine.runtime import Runtime
from multiserve.engine.tool_grammar import ToolSchemaError, tool_grammar

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
    """GBNF for a JSON schema given as JSON text; "" means any JSON object."""
    if json_schema == "":
        return ANY_JSON_OBJECT
    try:
        return json_schema_grammar(json.loads(json_schema))
    except SchemaNotEnforceable as exc:
        raise SamplingError(
            f"response_format json_schema cannot be enforced: {exc}", "response_format"
        ) from None


def grammar_spec(runtime: Runtime, params: SamplingParams) -> GrammarSpec | None:
    """The grammar a request's choices are held to, if any: its tool calls, or its JSON."""
    if params.tools is not None:
        try:
            gbnf = tool_grammar(params.tools)
        except ToolSchemaError as exc:
            raise SamplingError(str(exc), "tools") from None
        trigger = params.tools.layout.trigger
        token = runtime.special_tokens.get(trigger) if trigger else None
        return GrammarSpec(gbnf, token, lazy=not params.tools.required, param="tools")
    if params.json_schema is not None:
        return GrammarSpec(grammar_for(params.json_schema))
    return None


def choice_seed(params: SamplingParams, index: int) -> int | None:
    """Each of `n` choices gets its own stream: reproducible with a seed, random without."""
    if params.seed is None:
        return None
    return (params.seed + index) % ll.LLAMA_DEFAULT_SEED


class ChoiceSampler:
    """What one choice needs to pick its tokens: parameters, random stream, recent tokens."""

    def __init__(self, params: SamplingParams, seed: int | None, guard: GrammarGuard | None):
        self.params = params
        self.guard = guard
        self.rng = np.random.default_rng(seed)
        self.history: deque[int] = deque(maxlen=PENALTY_WINDOW)
        self.greedy = params.temperature < GREEDY_BELOW
        self.bias = dict(params.logit_bias)
        self.shown_token = guard.trigger_token if guard is not None else None

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
        if self.guard is not None:
            self.guard.free()
            self.guard = None


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar in GBNF. `trigger_token` is a special token the grammar's text starts with:
    shown in the output, and, if `lazy`, what arms the grammar (the text before it is free)."""

    gbnf: str
    trigger_token: int | None = None
    lazy: bool = False
    param: str = "response_format"  # the request field a refusal names


class GrammarGuard:
    """llama.cpp's grammar sampler for one choice, consulted as llama-server does: the token picked
    without it is checked alone, and only if the grammar refuses it are the whole vocabulary's
    logits masked and the token picked again. That is exact (the masked distribution), and it
    saves a grammar pass over the vocabulary at nearly every step, which on Gemma 3's 262,144
    tokens costs more than the decode itself.
    """

    def __init__(self, runtime: Runtime, spec: GrammarSpec):
        self._triggers = (ll.llama_token * 1)(spec.trigger_token or 0)
        if spec.lazy and spec.trigger_token is not None:
            self._grammar = ll.llama_sampler_init_grammar_lazy_patterns(
                runtime.vocab, spec.gbnf.encode(), b"root", None, 0, self._triggers, 1
            )
        else:
            self._grammar = ll.llama_sampler_init_grammar(
                runtime.vocab, spec.gbnf.encode(), b"root"
            )
        if not self._grammar:
            raise SamplingError("the schema gives an invalid grammar", spec.param)
        self.trigger_token = spec.trigger_token
        self._one = (ll.llama_token_data * 1)()
        self._one_array = ll.llama_token_data_array(self._one, 1, -1, False)
        self._all: np.ndarray | None = None

    def allows(self, token: int) -> bool:
        """Whether the grammar lets `token` come next (always, while it awaits its trigger)."""
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 0.0, 0.0
        self._one_array.size = 1
        ll.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        return self._one[0].logit != -np.inf

    def mask(self, logits: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """The logits of `ids` (by default every token), -inf where the grammar refuses."""
        if ids is None:
            if self._all is None or len(self._all) != len(logits):
                self._all = np.zeros(len(logits), _TOKEN_DATA)
                self._all["id"] = np.arange(len(logits), dtype=np.int32)
            data = self._all
            data["logit"] = logits
        else:
            data = np.zeros(len(ids), _TOKEN_DATA)
            data["id"], data["logit"] = ids, logits[ids]
        array = ll.llama_token_data_array(
            data.ctypes.data_as(ll.llama_token_data_p), len(data), -1, False
        )
        ll.llama_sampler_apply(self._grammar, ctypes.byref(array))  # sets -inf, keeps the order
        return data["logit"].copy()

    def accept(self, token: int) -> None:
        ll.llama_sampler_accept(self._grammar, token)

    def free(self) -> None:
        if self._grammar:
            ll.llama_sampler_free(self._grammar)
            self._grammar = None


GREEDY_CANDIDATES = 64  # tokens a greedy choice tries before masking the whole vocabulary
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
# Refused tokens get this instead of -inf: the native sampler assumes finite logits.
_REFUSED = np.float32(-1e30)


def make_sampler(
    runtime: Runtime, params: SamplingParams, grammar: GrammarSpec | None, index: int
) -> ChoiceSampler:
    seed = choice_seed(params, index)
    guard = GrammarGuard(runtime, grammar) if grammar is not None else None
    return ChoiceSampler(params, seed, guard)


_FLOAT_SIZE = ctypes.sizeof(ctypes.c_float)


def sample_step(runtime: Runtime, items: list[tuple[ChoiceSampler, int]]) -> list[int]:
    """The next token of each (choice, batch index) whose logits the last decode produced."""
    tokens = _sample_native(runtime, items) if items else []
    for i, (sampler, index) in enumerate(items):
        guard = sampler.guard
        if guard is not None:
            allowed: int | None = tokens[i]
            if not guard.allows(tokens[i]):
                allowed = _sample_within_grammar(runtime, sampler, guard, index)
            if allowed is None:  # no token continues the grammar: end the choice
                tokens[i] = ll.llama_vocab_eos(runtime.vocab)
            else:  # only an allowed token: llama.cpp aborts the process on a refused one
                tokens[i] = allowed
                guard.accept(allowed)
        sampler.history.append(tokens[i])
    return tokens


def _sample_within_grammar(
    runtime: Runtime, sampler: ChoiceSampler, guard: GrammarGuard, index: int
) -> int | None:
    """Pick again among the tokens the grammar allows, with the choice's own parameters; None
    when it allows none.

    Greedy choices look at the likeliest tokens first: the best of them the grammar allows is
    the answer, found without a pass over the whole vocabulary (about 50 ms on Gemma 3's).
    """
    logits = runtime.logits_view(index).copy()
    for token, value in sampler.overrides(logits).items():
        logits[token] = value
    if sampler.greedy:
        top = np.argpartition(-logits, GREEDY_CANDIDATES)[:GREEDY_CANDIDATES]
        top = top[np.lexsort((top, -logits[top]))]  # likeliest first; ties: lowest id, as argmax
        allowed = np.isfinite(guard.mask(logits, top))
        if allowed.any():
            return int(top[allowed.argmax()])
    masked = guard.mask(logits)
    refused = ~np.isfinite(masked)
    if refused.all():
        return None
    masked[refused] = _REFUSED
    token = _draw(masked, [0], [sampler], [{}])[0]
    if refused[token]:  # a refused token keeps a vanishing but nonzero weight: never let it out
        token = int(np.argmax(masked))
    return token


def _sample_native(runtime: Runtime, items: list[tuple[ChoiceSampler, int]]) -> list[int]:
    """Sample every item from the logits llama.cpp wrote, read in place."""
    n_vocab = runtime.n_vocab
    base = ctypes.cast(ll.llama_get_logits(runtime.ctx), ctypes.c_void_p).value
    rows: list[int] = []
    overrides: list[dict[int, float]] = []
    for sampler, index in items:
        address = ctypes.cast(ll.llama_get_logits_ith(runtime.ctx, index), ctypes.c_void_p).value
        rows.append((address - base) // (_FLOAT_SIZE * n_vocab))
        changes = sampler.bias or (sampler.params.penalised and sampler.history)
        overrides.append(sampler.overrides(runtime.logits_view(index)) if changes else {})
    size = (max(rows) + 1) * n_vocab
    logits = np.ctypeslib.as_array(ll.llama_get_logits(runtime.ctx), shape=(size,))
    return _draw(logits, rows, [sampler for sampler, _ in items], overrides)


def _draw(
    logits: np.ndarray,
    rows: list[int],
    samplers: list[ChoiceSampler],
    overrides: list[dict[int, float]],
) -> list[int]:
    """One token per sampler from row `rows[i]` of the flat `logits`, with its changed logits."""
    n = len(samplers)
    n_vocab = len(logits) // (max(rows) + 1)
    temperature = np.empty(n, np.float32)
    top_k = np.empty(n, np.int32)
    top_p = np.empty(n, np.float32)
    min_p = np.empty(n, np.float32)
    uniform = np.empty(n, np.float64)
    offsets = np.zeros(n + 1, np.int32)
    ids: list[int] = []
    values: list[float] = []
    for i, (sampler, changed) in enumerate(zip(samplers, overrides, strict=True)):
        params = sampler.params
        temperature[i] = 0.0 if sampler.greedy else params.temperature
        top_k[i], top_p[i], min_p[i] = params.top_k, params.top_p, params.min_p
        uniform[i] = 0.0 if sampler.greedy else sampler.rng.random()
        ids += changed.keys()
        values += changed.values()
        offsets[i + 1] = len(ids)
    out = np.empty(n, np.int32)
    _sampler.sample(
        logits,
        n_vocab,
        np.asarray(rows, np.int32),
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
