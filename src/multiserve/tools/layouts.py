"""How each model family writes tool calls, recognised from its chat template.

One layout serves three places that must agree to the character: the grammar that holds a call
to its schema (built in the worker), the parser that reads calls out of the generated text, and
the prompt that shows past calls to the model. Formats, as their published templates write them:

- Hermes / Qwen 2.5: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block
  per call; `<tool_call>` is a token of its own in Qwen's vocabulary.
- Mistral v0.3: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, the first
  a control token.
- Llama 3.x: one JSON object `{"name": ..., "parameters": {...}}` as the whole answer.
- Generic (templates that know no tools: Phi-4, Aya Expanse, Gemma 3): the model is told to
  answer with one JSON object, `{"tool_calls": [...]}` or `{"response": "..."}`, and is held to
  it from the first token, as llama.cpp does for such models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ToolLayout:
    """The literal text around calls. `trigger` is a special token that starts the calls: before
    it the model writes free text; without one, the whole answer is held to the layout."""

    family: str
    opening: str  # before the first call
    call_open: str  # before each call object
    call_close: str  # after each call object
    separator: str  # between two calls
    closing: str  # after the last call
    arguments_key: str = "arguments"
    trigger: str | None = None
    parallel: bool = True  # whether the family's format can carry several calls
    response_envelope: bool = False  # a plain answer is `{"response": "..."}`

    @property
    def start(self) -> str:
        """The text that begins the calls."""
        return self.opening + self.call_open


HERMES = ToolLayout(
    family="hermes",
    opening="",
    call_open="<tool_call>\n",
    call_close="\n</tool_call>",
    separator="\n",
    closing="",
    trigger="<tool_call>",
)
MISTRAL = ToolLayout(
    family="mistral",
    opening="[TOOL_CALLS] [",
    call_open="",
    call_close="",
    separator=", ",
    closing="]",
    trigger="[TOOL_CALLS]",
)
LLAMA3 = ToolLayout(
    family="llama3",
    opening="",
    call_open="",
    call_close="",
    separator="",
    closing="",
    arguments_key="parameters",
    parallel=False,
)
GENERIC = ToolLayout(
    family="generic",
    opening='{"tool_calls": [',
    call_open="",
    call_close="",
    separator=", ",
    closing="]}",
    response_envelope=True,
)
RESPONSE_OPENING = '{"response": '  # the generic layout's plain answer: this, a JSON string, "}"


def detect_layout(template: str, single_tokens: frozenset[str]) -> ToolLayout:
    """The family's layout, from the chat template's own text; a family whose trigger is not one
    token in this model's vocabulary gets the generic layout (a lazy grammar needs the token)."""
    if "[TOOL_CALLS]" in template and "[TOOL_CALLS]" in single_tokens:
        return MISTRAL
    if "<tool_call>" in template and "<tool_call>" in single_tokens:
        return HERMES
    if "ipython" in template and '"parameters"' in template:
        return LLAMA3
    return GENERIC


def native_tools(template: str, layout: ToolLayout) -> bool:
    """Whether the template renders `tools` itself (else the generic instructions are added)."""
    return layout is not GENERIC and "tools" in template


# Trigger texts the worker looks up in the vocabulary at load.
TRIGGERS = tuple(layout.trigger for layout in (HERMES, MISTRAL) if layout.trigger)
