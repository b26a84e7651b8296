"""Property test: whatever JSON a client sends, the answer is a success or an OpenAI client error.

Bodies mix the real request fields (each endpoint's own prompt field, so a good share of them
gets past validation into generation) with wrong types, extreme numbers, odd strings and unknown
keys; the server must never answer 5xx, never leak a traceback, and keep serving. The cases follow
conftest's FUZZ_SEED, which a failure prints.
"""

from __future__ import annotations

import httpx
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from conftest import FUZZ_SEED

FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "n",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "stream",
    "stream_options",
    "response_format",
    "ignore_eos",
    "tools",
    "user",
    "bogus",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "x"]),
            "content": st.one_of(st.text(max_size=30), values),
        }
    ),
    max_size=3,
)
prompts = st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 600), max_size=5))


def plausible(field: str, strategy: st.SearchStrategy) -> st.SearchStrategy[dict]:
    """A request its endpoint could take (its own prompt field), with fuzzed fields on top: a
    good share of cases gets past validation, into generation."""
    return st.builds(
        lambda base, extra: {**base, "max_tokens": 3, **extra},  # short unless fuzzed otherwise
        st.fixed_dictionaries(
            {"model": st.sampled_from(["tiny", "tiny-alias", "nope", ""]), field: strategy},
            optional={"stream": st.booleans()},
        ),
        st.just({}) | st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
    )


requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), plausible("messages", messages)),
    st.tuples(st.just("/v1/completions"), plausible("prompt", prompts)),
)


@seed(FUZZ_SEED)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=requests)
def test_any_body_gets_a_clean_answer(server, case: tuple[str, dict]) -> None:
    path, body = case
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post(path, json=body)
        assert response.status_code in (200, 400, 404, 413), (response.status_code, path, body)
        assert "Traceback" not in response.text
        if response.status_code != 200:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["type"]
        assert http.get("/health").status_code == 200
