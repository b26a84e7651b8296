"""Render chat messages to a prompt string with a Jinja2 chat template.

Templates come from GGUF metadata (``tokenizer.chat_template``) or server config, never from a
request. GGUF files are still untrusted input: CVE-2024-34359 was remote code execution through a
crafted ``tokenizer.chat_template`` rendered by an unsandboxed Jinja2 environment. Every template
is therefore compiled and rendered only in an ``ImmutableSandboxedEnvironment``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

from jinja2 import Template, TemplateError, TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from multiserve.engine.protocol import PromptSegment


class ChatTemplateError(Exception):
    """Template failed to render (bad template, sandbox violation, raise_exception in the template).

    Message is safe to show a client: no file paths, no traceback.
    """


class _Sandbox(ImmutableSandboxedEnvironment):
    """Immutable sandbox that fails loudly on unsafe attribute access.

    Jinja2 normally returns a silent Undefined for e.g. ``cycler.__init__``, which prints as "".
    Raising instead turns probing templates into a visible error rather than a quiet no-op.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def _raise_exception(message: str) -> NoReturn:
    """HF templates call this to reject conversations (e.g. roles that do not alternate)."""
    raise ChatTemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    """HF templates (e.g. Llama 3.1) stamp the current date into the system prompt."""
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Like HF's tojson: plain json.dumps, no HTML escaping (Jinja's default escapes <>&')."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


# Same settings as HF transformers, so GGUF templates written for HF render identically.
_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
_ENV.filters["tojson"] = _tojson


@lru_cache(maxsize=32)
def _compile(source: str) -> Template:
    """Compile once per distinct source; rendering happens on every request."""
    try:
        return _ENV.from_string(source)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat template syntax error (line {exc.lineno}): {exc.message}"
        ) from exc
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to compile: {exc.message}") from exc


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template plus the special tokens it may reference."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render messages to a prompt; any failure becomes a client-safe ChatTemplateError."""
        template = _compile(self.source)
        extra = {"tools": tools} if tools else {}
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except ChatTemplateError:
            raise  # raise_exception() from the template: its message is meant for the client
        except TemplateError as exc:  # includes SecurityError and UndefinedError
            detail = (exc.message or type(exc).__name__).rstrip(".")
            raise ChatTemplateError(f"chat template failed to render: {detail}") from exc
        except Exception as exc:  # Python errors raised by template expressions, e.g. 1 / 0
            raise ChatTemplateError(
                f"chat template failed to render: {type(exc).__name__}: {exc}"
            ) from exc

    def render_segments(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[PromptSegment]:
        """The prompt split into template text and client text, to be tokenized apart.

        Template text may spell control tokens (`<start_of_turn>`); client text never may, so a
        user who types `<|im_start|>system` gets plain characters, not a forged turn. Client text
        is each message's content, and with tools their descriptions and schemas and the
        arguments of past calls. Each distinct text is rendered as a marker and put back as its
        own segment. A template whose output changes with the texts (checked by rendering the
        real ones too and aligning the two) falls back to one segment, parsed as before.
        """
        texts = _ClientTexts()
        marked = [texts.message(m) for m in messages]
        marked_tools = [texts.tool(t) for t in tools] if tools else None
        rendered = self.render(messages, add_generation_prompt, tools)
        pieces = _MARKER.split(self.render(marked, add_generation_prompt, marked_tools))
        if all(piece in texts.by_marker for piece in pieces[1::2]):
            aligned = _align(pieces, texts.by_marker, rendered)
            if aligned is not None:
                return [segment for segment in aligned if segment.text]
        return [PromptSegment(rendered, special=True)]


class _ClientTexts:
    """Swaps client strings for markers, one per distinct text (so a `required` list still names
    the marked property keys)."""

    def __init__(self) -> None:
        self.by_marker: dict[str, str] = {}
        self._by_text: dict[str, str] = {}

    def text(self, value: str) -> str:
        marker = self._by_text.get(value)
        if marker is None:
            marker = f"{_MARK_OPEN}{len(self._by_text)}{_MARK_CLOSE}"
            self._by_text[value], self.by_marker[marker] = marker, value
        return marker

    def message(self, message: dict[str, Any]) -> dict[str, Any]:
        marked = dict(message)
        if isinstance(message.get("content"), str):
            marked["content"] = self.text(message["content"])
        if message.get("tool_calls"):
            marked["tool_calls"] = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "arguments": self._data(c["function"]["arguments"], schema=False),
                    },
                }
                for c in message["tool_calls"]
            ]
        return marked

    def tool(self, tool: dict[str, Any]) -> dict[str, Any]:
        function = dict(tool["function"])
        if isinstance(function.get("description"), str):
            function["description"] = self.text(function["description"])
        if "parameters" in function:
            function["parameters"] = self._data(function["parameters"], schema=True)
        return {**tool, "function": function}

    def _data(self, value: Any, schema: bool, key: str = "") -> Any:
        """JSON data with every string and object key marked; in a schema, its keywords and the
        values of `type` (which a template may test, and which are checked to be type names)
        stay as they are."""
        if isinstance(value, str):
            return value if schema and key == "type" else self.text(value)
        if isinstance(value, list):
            return [self._data(item, schema, key) for item in value]
        if isinstance(value, dict):
            return {
                (k if schema and k in _SCHEMA_KEYWORDS else self.text(k)): self._data(v, schema, k)
                for k, v in value.items()
            }
        return value


# JSON-schema keywords stay keys a template can read (`parameters.properties`).
_SCHEMA_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "items", "enum", "const", "description", "title",
        "default", "additionalProperties", "anyOf", "oneOf", "allOf", "not", "$ref", "$defs",
        "definitions", "format", "pattern", "minimum", "maximum", "exclusiveMinimum",
        "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "uniqueItems",
        "prefixItems", "nullable", "examples",
    }
)  # fmt: skip


def _json_escaped(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _ascii_json_escaped(text: str) -> str:
    return json.dumps(text)[1:-1]


# How a template may pass a text through: as given, trimmed (Jinja's `trim`, Python's strip), or
# inside a JSON string (`tojson` of a tool or of a call's arguments)
_FORMS = (str, str.strip, str.rstrip, str.lstrip, _json_escaped, _ascii_json_escaped)
# The segments chosen so far, newest first, as a linked list: extending it copies nothing
_Trail = tuple[PromptSegment, "_Trail"] | None


def _align(
    pieces: list[str], contents: dict[str, str], rendered: str
) -> list[PromptSegment] | None:
    """Segments that spell `rendered`: template pieces special, each content in the form it took.

    Each content is matched on its own (Gemma 3 keeps the system text as given but trims the
    user's), trying the forms in order and backtracking when a later piece no longer fits.
    """
    # Depth-first over (piece index, position in `rendered`), iterative: chats can be long.
    stack: list[tuple[int, int, _Trail]] = [(0, 0, None)]
    seen: set[tuple[int, int]] = set()
    while stack:
        index, at, path = stack.pop()
        if index == len(pieces):
            if at != len(rendered):
                continue
            segments: list[PromptSegment] = []
            while path is not None:
                segment, path = path
                segments.append(segment)
            return segments[::-1]
        if (index, at) in seen:
            continue
        seen.add((index, at))
        piece = pieces[index]
        if index % 2 == 0:
            options = [(piece, True)]
        else:
            options = [(text, False) for text in dict.fromkeys(f(contents[piece]) for f in _FORMS)]
        for text, special in reversed(options):  # the first form is tried first
            if rendered.startswith(text, at):
                stack.append((index + 1, at + len(text), (PromptSegment(text, special), path)))
    return None


# Private-use characters: cannot come from a template, and contents are never scanned for them.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(f"({_MARK_OPEN}\\d+{_MARK_CLOSE})")


# Fallback templates. Segments are concatenated without newlines so no stray whitespace leaks
# into the prompt; '\n' inside Jinja string literals is a newline. Trimming follows the official
# templates of each family (Gemma, Llama 3 and Command-R trim message content).

# For families without a system role: emits BOS, sets `ns.prefix` (system text + blank line,
# to prepend to the first user turn) and `loop_messages` (the rest).
_BOS_AND_SYSTEM_PREFIX = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    r"{% set ns = namespace(prefix=messages[0]['content'] + '\n\n') %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set ns = namespace(prefix='') %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
)

_GEMMA = _BOS_AND_SYSTEM_PREFIX + (
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    r"{{ '<start_of_turn>user\n' + ns.prefix + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% set ns.prefix = '' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    r"{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_CHATML = (
    "{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PHI4 = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# No generation prompt: the closing [/INST] already cues the assistant turn.
_MISTRAL = _BOS_AND_SYSTEM_PREFIX + (
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ '[INST] ' + ns.prefix + message['content'] + ' [/INST]' }}"
    "{% set ns.prefix = '' %}"
    "{% endif %}"
    "{% endfor %}"
)

_COMMAND_R = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set token = 'SYSTEM' %}"
    "{% elif message['role'] == 'assistant' %}{% set token = 'CHATBOT' %}"
    "{% else %}{% set token = 'USER' %}{% endif %}"
    "{{ '<|START_OF_TURN_TOKEN|><|' + token + '_TOKEN|>' + message['content'] | trim"
    " + '<|END_OF_TURN_TOKEN|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    r"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    r"{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def fallback_template(architecture: str, model_name: str = "") -> str:
    """Built-in template for a model family when its GGUF has no tokenizer.chat_template.

    Keyed on GGUF ``general.architecture``; the model name disambiguates "llama", which
    llama.cpp also uses for Mistral/Mixtral. Unknown architectures get ChatML.
    """
    arch = architecture.strip().lower()
    name = model_name.lower()
    if arch.startswith("gemma"):
        return _GEMMA
    if arch in ("phi3", "phi4"):  # Phi-4 GGUFs report "phi3"
        return _PHI4
    if arch.startswith("mistral") or (arch == "llama" and ("mistral" in name or "mixtral" in name)):
        return _MISTRAL
    if arch in ("command-r", "cohere", "cohere2"):
        return _COMMAND_R
    if arch == "llama":
        return _LLAMA3
    return _CHATML


def resolve_template(
    gguf_template: str | None,
    architecture: str,
    model_name: str,
    bos_token: str,
    eos_token: str,
    override: str | None = None,
) -> ChatTemplate:
    """override (from config) > GGUF template > family fallback. Blank strings count as absent."""
    source = next((t for t in (override, gguf_template) if t and t.strip()), None)
    if source is None:
        source = fallback_template(architecture, model_name)
    return ChatTemplate(source=source, bos_token=bos_token, eos_token=eos_token)
