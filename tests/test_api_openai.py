"""The official openai client against a real server on loopback, serving a tiny generated model.

Random weights make free text gibberish, so exact-output tests force the text: a +100 logit bias
on one token, or a JSON-schema grammar that admits a single string.

Every test runs twice: with the models in local worker processes, and with the same config on a
two-node Ray cluster (`--ray`), so both backends answer the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from llama_cpp import Llama, LlamaGrammar

from conftest import BACKENDS, RunningServer, on_each_backend
from multiserve.engine.json_grammar import json_schema_grammar
from tiny_gguf import BOS_ID, TOKEN_TO_ID

HELLO = TOKEN_TO_ID["\u2581hello"]  # token " hello"
FORCED = "héllo € wörld 東京 STOP tail"
FORCE_SCHEMA = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"enum": [FORCED]}}}


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[RunningServer]:
    yield from on_each_backend(request, server)


def test_chat_completion_answers_with_usage(server) -> None:
    reply = server.openai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, seed=1
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion"
    assert reply.model == "tiny"
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_alias_serves_the_same_model(server) -> None:
    reply = server.openai.completions.create(model="tiny-alias", prompt="hello", max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_max_tokens_ends_with_length(server) -> None:
    reply = server.openai.completions.create(
        model="tiny", prompt="hello", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_max_completion_tokens_is_honoured(server) -> None:
    reply = server.openai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == 3


def test_logit_bias_forces_a_token(server) -> None:
    reply = server.openai.completions.create(
        model="tiny", prompt="the", max_tokens=4, temperature=0, logit_bias={str(HELLO): 100}
    )
    assert reply.choices[0].text == " hello" * 4


def test_streaming_equals_non_streaming_and_reports_usage(server) -> None:
    args = dict(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
    whole = server.openai.completions.create(**args)
    chunks = list(
        server.openai.completions.create(
            **args, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]


def test_chat_stream_starts_with_role_and_ends_with_done(server) -> None:
    with server.http() as http:
        lines = []
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "stream": True,
        }
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_n_gives_independent_choices(server) -> None:
    reply = server.openai.completions.create(
        model="tiny", prompt="the", n=3, max_tokens=16, seed=7, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 48
    assert len({c.text for c in reply.choices}) > 1  # each choice samples its own sequence


def test_n_choices_of_one_token_each(server) -> None:
    # the first choice finishes on its first token, before the others fork its prompt (a crash once)
    reply = server.openai.completions.create(model="tiny", prompt="the", n=3, max_tokens=1)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert reply.usage.completion_tokens == 3


def test_vanishing_temperature_with_a_grammar_decodes_greedily(server) -> None:
    # logits over a 1e-38 temperature overflow float32; the grammar must still hold (a crash once)
    args = dict(model="tiny", prompt="{", max_tokens=12, response_format={"type": "json_object"})
    with server.http() as http:
        tiny = http.post("/v1/completions", json={**args, "temperature": 1e-38})
        greedy = http.post("/v1/completions", json={**args, "temperature": 0})
    assert tiny.status_code == greedy.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_explicit_nulls_mean_defaults(server) -> None:
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "logprobs", "stop", "seed"))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    with server.http() as http:
        reply = http.post("/v1/chat/completions", json={**body, **nulls})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 1


def test_n_in_a_stream(server) -> None:
    stream = server.openai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=4, stream=True
    )
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_seed_reproduces_sampling(server) -> None:
    args = dict(
        model="tiny",
        prompt="the dog",
        max_tokens=24,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    first = server.openai.completions.create(**args, seed=42).choices[0].text
    again = server.openai.completions.create(**args, seed=42).choices[0].text
    other = server.openai.completions.create(**args, seed=43).choices[0].text
    assert first == again
    assert first != other


def test_json_schema_output_parses_and_validates(server) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Zürich", "東京"]},
            "ok": {"type": "boolean"},
        },
        "required": ["city", "ok"],
        "additionalProperties": False,
    }
    reply = server.openai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "city?"}],
        max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_json_object_mode_gives_json(server) -> None:
    reply = server.openai.completions.create(
        model="tiny",
        prompt="{",
        max_tokens=200,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].text), dict)
    else:  # a random model may still be inside a long string: it must be a JSON prefix
        assert reply.choices[0].text.lstrip().startswith("{")


def _forced_stream(server, **extra: object) -> list:
    """Streamed choices of a completion whose text the grammar forces to be FORCED, quoted."""
    stream = server.openai.completions.create(
        model="tiny",
        prompt="say",
        max_tokens=100,
        temperature=0,
        stream=True,
        extra_body={"response_format": FORCE_SCHEMA},
        **extra,
    )
    return [c.choices[0] for c in stream if c.choices]


def test_multibyte_utf8_streams_whole_characters(server) -> None:
    pieces = [choice.text for choice in _forced_stream(server)]
    assert "".join(pieces) == json.dumps(FORCED, ensure_ascii=False)
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_string_never_leaks_into_the_stream(server) -> None:
    chunks = _forced_stream(server, stop=["STOP"])
    text = "".join(c.text for c in chunks)
    assert text == '"héllo € wörld 東京 '
    assert chunks[-1].finish_reason == "stop"
    assert not any(piece.text.endswith(("S", "ST", "STO")) for piece in chunks)


def test_chat_logprobs(server) -> None:
    reply = server.openai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 3
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob


def test_completion_logprobs_follow_greedy_choice(server) -> None:
    reply = server.openai.completions.create(
        model="tiny",
        prompt="the",
        max_tokens=3,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True):
        assert list(top) == [token]  # greedy picks the likeliest token


def _reference_logprobs(
    model: Path, tokens: list[int], outputs: int, top: int
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """log_softmax of the raw logits after each of the last `outputs` positions of `tokens`, and
    at each the `top` likeliest tokens' text and logprob, in order, as the completions API shows.

    Computed by llama-cpp-python's own Llama on the same GGUF, one sequence in one context:
    none of multiserve's batching, slots, sampling or logprob code is involved.
    """
    llm = Llama(str(model), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(tokens)
        logits = np.asarray(llm.scores[len(tokens) - outputs : len(tokens)], np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        likeliest = [
            {
                llm.detokenize([int(t)]).decode("utf-8", errors="replace"): float(row[t])
                for t in np.argsort(-row)[:top]
            }
            for row in logprobs
        ]
    finally:
        llm.close()
    return logprobs, likeliest


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_logprobs_are_the_models_raw_log_softmax(server, tiny_model: Path, temperature: float):
    """Logprobs report the model's distribution: the raw logits, before logit_bias and temperature.

    A +100 bias forces every token to " hello" although the model finds it unlikely: its reported
    logprob is the model's low one (near 0 would mean after the bias), the same at any
    temperature, and each step's top alternatives are the model's own likeliest tokens.
    """
    prompt = [BOS_ID, TOKEN_TO_ID["\u2581the"], TOKEN_TO_ID["\u2581cat"]]
    steps, top = 4, 5
    reply = server.openai.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=steps,
        temperature=temperature,
        seed=1,
        logprobs=top,
        logit_bias={str(HELLO): 100},
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs.tokens == [" hello"] * steps
    # the logits after the prompt's last token, then after each generated token but the last
    reference, likeliest = _reference_logprobs(
        tiny_model, prompt + [HELLO] * (steps - 1), steps, top
    )
    # llama.cpp's kernels differ (flash attention, batch shapes) by about 1e-3 here
    assert logprobs.token_logprobs == pytest.approx(reference[:, HELLO].tolist(), abs=0.01)
    assert max(logprobs.token_logprobs) < -1  # the bias is not in them
    for reported, expected in zip(logprobs.top_logprobs, likeliest, strict=True):
        assert list(reported) == list(expected)  # the same tokens, in the same order
        assert reported == pytest.approx(expected, abs=0.01)


def test_token_id_prompt(server) -> None:
    reply = server.openai.completions.create(model="tiny", prompt=[1, HELLO], max_tokens=2)
    assert reply.usage.prompt_tokens == 2


def test_quantized_kv_cache_model_serves(server) -> None:
    reply = server.openai.completions.create(
        model="tiny-q8", prompt="hello", max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 8


def test_control_tokens_typed_in_messages_stay_plain_text(server) -> None:
    """A user cannot forge turns: `<start_of_turn>` in content is characters, not the token."""

    def prompt_tokens(content: str) -> int:
        reply = server.openai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": content}], max_tokens=1
        )
        return reply.usage.prompt_tokens

    typed = prompt_tokens("<start_of_turn>") - prompt_tokens("")
    assert typed >= len("<start_of_turn>") // 2  # many plain pieces, not one control token
    # the completions endpoint takes raw prompts, where spelled control tokens are honoured
    raw = server.openai.completions.create(model="tiny", prompt="<start_of_turn>", max_tokens=1)
    assert raw.usage.prompt_tokens == 2  # BOS + the control token


def test_no_op_values_of_unimplemented_fields_are_accepted(server) -> None:
    # clients that send every field at its default must work, and get the same answer
    chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, seed=3)
    plain = server.openai.chat.completions.create(**chat)
    with_defaults = server.openai.chat.completions.create(
        **chat,
        tools=[],
        tool_choice="none",
        parallel_tool_calls=True,
        logprobs=None,
        modalities=["text"],
        prediction={"type": "content", "content": "Hello"},
        stream_options=None,
        extra_body={"functions": [], "function_call": "auto", "prompt_cache_key": "k"},
    )
    assert with_defaults.choices[0].message.content == plain.choices[0].message.content
    text = dict(model="tiny", prompt="the cat", max_tokens=6, temperature=0)
    plain_text = server.openai.completions.create(**text)
    defaults = server.openai.completions.create(
        **text, echo=False, best_of=1, suffix="", logprobs=None, stream=False, user="u"
    )
    assert defaults.choices[0].text == plain_text.choices[0].text


def test_list_prompt_gives_n_choices_per_prompt_in_order(server) -> None:
    prompts = ["the cat", "a dog", "the"]
    args = dict(model="tiny", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    alone = [server.openai.completions.create(prompt=p, **args) for p in prompts]
    together = server.openai.completions.create(prompt=prompts, n=2, **args)
    assert [c.index for c in together.choices] == list(range(6))
    for i, reply in enumerate(alone):  # greedy: both choices of prompt i are its lone answer
        assert [c.text for c in together.choices[2 * i : 2 * i + 2]] == [reply.choices[0].text] * 2
    assert together.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone)
    assert together.usage.completion_tokens == 30


def test_list_prompt_streams_every_choice_and_token_lists_work(server) -> None:
    args = dict(model="tiny", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    whole = server.openai.completions.create(prompt=[[1, HELLO], [1, HELLO, HELLO]], **args)
    stream = server.openai.completions.create(
        prompt=[[1, HELLO], [1, HELLO, HELLO]], stream=True, **args
    )
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]
    assert len(whole.choices) == 2


def test_too_many_prompts_for_the_queue_is_refused_whole(server) -> None:
    with server.http() as http:
        reply = http.post(
            "/v1/completions", json={"model": "tiny", "prompt": ["x"] * 200, "max_tokens": 1}
        )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "too_many_prompts"


@pytest.mark.parametrize("seed", [1, 2])
def test_greedy_json_schema_output_equals_llama_cpps_own_grammar_sampling(
    server, tiny_model: Path, seed: int
) -> None:
    """Grammar-held greedy decoding (free pick checked alone, then the likeliest allowed tokens,
    then a mask of the whole vocabulary) gives exactly the tokens of llama-cpp-python's `Llama`
    with the same grammar masking every step. The random model's own picks are mostly refused,
    so every path is taken."""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "n": {"type": "integer", "minimum": 0, "maximum": 30},
            "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
        },
        "required": ["name", "n", "tags"],
    }
    prompt = [BOS_ID, TOKEN_TO_ID["\u2581the"], TOKEN_TO_ID["\u2581cat"], seed + 10]
    reply = server.openai.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=60,
        temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}},
    )
    llm = Llama(str(tiny_model), n_ctx=256, n_threads=1, verbose=False)
    try:
        grammar = LlamaGrammar.from_string(json_schema_grammar(schema), verbose=False)
        expected = llm.create_completion(
            prompt, max_tokens=60, temperature=0, repeat_penalty=1.0, grammar=grammar
        )
    finally:
        llm.close()
    assert reply.choices[0].text == expected["choices"][0]["text"]
    assert len(reply.choices[0].text) > 20
