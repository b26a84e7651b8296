"""Reading tool calls out of generated text: every family's layout, split at every position."""

from __future__ import annotations

import json

import pytest

from multiserve.tools.layouts import GENERIC, HERMES, LLAMA3, MISTRAL, ToolLayout, detect_layout
from multiserve.tools.parsing import ToolCallReader

WEATHER = {"city": 'Paris "centre" {x}', "days": [1, {"n": 2}]}
TWO_CALLS = {
    HERMES: 'I will check.\n<tool_call>\n{"name": "weather", "arguments": '
    + json.dumps(WEATHER)
    + '}\n</tool_call>\n<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>',
    MISTRAL: '[TOOL_CALLS] [{"name": "weather", "arguments": '
    + json.dumps(WEATHER)
    + '}, {"name": "time", "arguments": {}}]',
    GENERIC: '{"tool_calls": [{"name": "weather", "arguments": '
    + json.dumps(WEATHER)
    + '}, {"name": "time", "arguments": {}}]}',
}


def _read(layout: ToolLayout, text: str, cut: int) -> tuple[str, list[tuple[str, str]], dict]:
    """Feed `text` in two pieces split at `cut`; return content, calls, and streamed arguments."""
    reader = ToolCallReader(layout)
    content, streamed = "", {}
    for piece in (text[:cut], text[cut:]):
        parsed = reader.feed(piece)
        content += parsed.content
        for delta in parsed.calls:
            streamed[delta.index] = streamed.get(delta.index, "") + delta.arguments
    content += reader.finish().content
    return content, [(c.name, c.arguments) for c in reader.calls], streamed


@pytest.mark.parametrize("layout", [HERMES, MISTRAL, GENERIC], ids=lambda x: x.family)
def test_parallel_calls_are_read_whole_wherever_the_stream_splits(layout: ToolLayout) -> None:
    text = TWO_CALLS[layout]
    expected_content = "I will check.\n" if layout is HERMES else ""
    for cut in range(len(text) + 1):
        content, calls, streamed = _read(layout, text, cut)
        assert content == expected_content, cut
        assert [name for name, _ in calls] == ["weather", "time"], cut
        assert json.loads(calls[0][1]) == WEATHER and json.loads(calls[1][1]) == {}, cut
        assert streamed == {0: calls[0][1], 1: calls[1][1]}, cut


def test_llama3_reads_one_call_and_leaves_plain_text_alone() -> None:
    text = '{"name": "weather", "parameters": ' + json.dumps(WEATHER) + "}"
    for cut in range(len(text) + 1):
        content, calls, _ = _read(LLAMA3, text, cut)
        assert content == "" and calls[0][0] == "weather" and json.loads(calls[0][1]) == WEATHER
    assert _read(LLAMA3, "Sure: it is sunny {really}", 3)[:2] == ("Sure: it is sunny {really}", [])


def test_generic_plain_answers_are_decoded_as_they_stream() -> None:
    answer = 'Caf\u00e9 "ok"\nline \\ two \u20ac'
    text = '{"response": ' + json.dumps(answer) + "}"
    for cut in range(len(text) + 1):
        content, calls, _ = _read(GENERIC, text, cut)
        assert (content, calls) == (answer, []), cut


def test_text_that_only_looks_like_a_call_stays_content() -> None:
    text = "a <tool and <tool_cal but no call"
    for cut in range(len(text) + 1):
        assert _read(HERMES, text, cut)[:2] == (text, [])
    assert _read(GENERIC, "plain answer", 0)[:2] == ("plain answer", [])


def test_call_ids_are_openai_shaped_and_distinct() -> None:
    reader = ToolCallReader(MISTRAL)
    reader.feed(TWO_CALLS[MISTRAL])
    ids = [call.id for call in reader.calls]
    assert len(set(ids)) == 2
    assert all(i.startswith("call_") and len(i) == 29 and i[5:].isalnum() for i in ids)


def test_layouts_are_recognised_from_templates() -> None:
    triggers = frozenset({"<tool_call>", "[TOOL_CALLS]"})
    assert detect_layout("... <tool_call> ... tools ...", triggers) is HERMES
    assert detect_layout("[AVAILABLE_TOOLS] [TOOL_CALLS]", triggers) is MISTRAL
    assert detect_layout('ipython ... {"name": x, "parameters": y}', triggers) is LLAMA3
    assert detect_layout("<start_of_turn>user", triggers) is GENERIC
    # a trigger that is not one token in the vocabulary cannot arm a lazy grammar
    assert detect_layout("... <tool_call> ...", frozenset()) is GENERIC


def test_escaped_surrogate_pairs_decode_to_one_character_and_lone_halves_to_a_mark() -> None:
    """`\\ud83d\\ude00` is one emoji; decoded half by half it would be two lone surrogates,
    which cannot be encoded as UTF-8 and would break the response."""
    text = '{"response": ' + json.dumps("smile \U0001f600 ok") + "}"
    for cut in range(len(text) + 1):
        assert _read(GENERIC, text, cut)[0] == "smile \U0001f600 ok", cut
    lone = '{"response": "a\\ud83d b\\ude00c"}'
    for cut in range(len(lone) + 1):
        assert _read(GENERIC, lone, cut)[0] == "a\ufffd b\ufffdc", cut


def test_text_that_opens_like_a_call_but_is_none_is_kept_as_content() -> None:
    """Llama 3's plain answers may start with ` {` (its grammar holds only a call at the very
    start): an answer that never becomes a call is returned, not dropped."""
    text = "{not a call, just braces}"
    for cut in range(len(text) + 1):
        assert _read(LLAMA3, text, cut)[:2] == (text, []), cut
