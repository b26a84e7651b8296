"""OpenAI request bodies, validated with pydantic; fields we do not serve are refused by name.

OpenAI itself answers 400 to an argument it does not know, and a client that sends `functions`
must learn we ignore them rather than get a silently function-less answer. Fields we do not
implement are still accepted at their no-op values (`echo: false`, `functions: []`, ...), because
many clients send every field with its default.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256

# OpenAI fields we understand but do not implement: refused with a message naming them.
UNSUPPORTED_FIELDS = frozenset({"audio", "web_search_options", "reasoning_effort", "verbosity"})
# OpenAI fields accepted only at values that change nothing here, and those values as said to a
# client whose request uses another one.
NO_OP_VALUES = {
    "echo": "false",
    "best_of": "1",
    "suffix": '""',
    "functions": "[] (use `tools`)",
    "function_call": '"none" or "auto" (use `tool_choice`)',
    "modalities": '["text"]',
}
NoTools = Annotated[list[dict[str, Any]], Field(max_length=0)]


def _only(value: object) -> object:
    """A field accepted at `value` alone, of its exact type (`Literal[False]` would take 0)."""

    def check(given: object) -> object:
        if type(given) is not type(value) or given != value:
            raise ValueError(f"only {json.dumps(value)} is supported")
        return given

    return Annotated[type(value), AfterValidator(check), WithJsonSchema({"const": value})]


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _integral(value: object) -> object:
    """JSON Schema counts 2.0 as an integer, so we do too; strings and booleans stay errors."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


WHOLE = BeforeValidator(_integral)  # after the bounds, or pydantic would not publish them
TokenCount = Annotated[int, Field(ge=1, le=1 << 20), WHOLE]
TopLogprobs = Annotated[int, Field(ge=0, le=20), WHOLE]
Seed = Annotated[int, WHOLE]  # any integer: it is reduced modulo llama.cpp's seed range
MAX_PROMPT_CHARS = 1 << 22
MAX_PROMPT_TOKENS = 1 << 20
MAX_IMAGE_URL = 1 << 22  # a data: URL holds the image itself
MAX_PROMPTS = 256  # per /v1/completions request; each is one request in the model's queue
TOKEN_KEY = r"^[0-9]{1,10}$"
MAX_TOKEN_ID = (1 << 31) - 1  # llama_token is an int32
TokenIdValue = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID), WHOLE]
# Published as JSON Schema, checked by validators below with messages that say what to do.
PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID},
            "minItems": 1,
            "maxItems": MAX_PROMPT_TOKENS,
        },
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
            "minItems": 1,
            "maxItems": MAX_PROMPTS,
        },
        {
            "type": "array",
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID},
                "minItems": 1,
                "maxItems": MAX_PROMPT_TOKENS,
            },
            "minItems": 1,
            "maxItems": MAX_PROMPTS,
        },
    ]
}


def _is_prompt_list(value: object) -> bool:
    """A list of prompts (strings or token lists), as opposed to one prompt's token ids."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], str | list)


LOGIT_BIAS_SCHEMA = {
    "type": "object",
    "patternProperties": {TOKEN_KEY: {"type": "number", "minimum": -100, "maximum": 100}},
    "additionalProperties": False,
}
StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    include_obfuscation: bool = True  # random padding against length side channels: none here


MAX_SCHEMA_DEPTH = 32


def _check_schema_node(node: Any, depth: int) -> None:
    """Refuse remote `$ref`s (the grammar converter would fetch them) and absurd nesting."""
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
            raise ValueError("only local `$ref`s (starting with '#') are allowed")
        for value in node.values():
            _check_schema_node(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            _check_schema_node(value, depth + 1)


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None

    @field_validator("schema_")
    @classmethod
    def _safe_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_schema_node(value, 0)
        return value


def required_unless(field: str, key: str, values: list[str]) -> dict[str, Any]:
    """JSON Schema for "`field` must be given (not null) unless `key` is one of `values`", so the
    published schema says what a model validator checks."""
    return {
        "anyOf": [
            {"properties": {key: {"enum": values}}},
            {"required": [field], "properties": {field: {"not": {"type": "null"}}}},
        ]
    }


class ResponseFormat(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra=required_unless("json_schema", "type", ["text", "json_object"]),
    )
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`json_schema` is required when type is 'json_schema'")
        return self


def _nulls_allowed(schema: dict[str, Any]) -> None:
    """Publish what `_null_means_default` does: every optional field may be null. And no extra
    fields: they are kept only to be refused by name."""
    schema["additionalProperties"] = False
    required = set(schema.get("required", ()))
    for name, prop in schema["properties"].items():
        alternatives = prop.get("anyOf", [prop])
        if name in required or any(alt.get("type") == "null" for alt in alternatives):
            continue
        meta = {k: prop.pop(k) for k in ("title", "default", "description") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **meta}


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions.

    Strict types, as OpenAI's own API: `"max_tokens": "5"` is an error, not a 5; null means the
    default. Extra fields are kept only to be refused by name.
    """

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_nulls_allowed)

    model: str = Field(min_length=1, max_length=256)
    max_tokens: TokenCount | None = None
    temperature: FiniteFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: FiniteFloat = Field(default=1.0, gt=0.0, le=1.0)
    top_k: Annotated[int, Field(ge=0, le=1 << 20), WHOLE] = 0
    min_p: FiniteFloat = Field(default=0.0, ge=0.0, le=1.0)
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    presence_penalty: FiniteFloat = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: FiniteFloat = Field(default=0.0, ge=-2.0, le=2.0)
    # at least 0.01: llama.cpp divides logits by it in float32, and a zero there makes NaNs
    repeat_penalty: FiniteFloat = Field(default=1.0, ge=0.01, le=10.0)
    logit_bias: Annotated[dict[str, Bias], WithJsonSchema(LOGIT_BIAS_SCHEMA)] | None = None
    n: Annotated[int, Field(ge=1, le=256), WHOLE] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False  # extension used by benchmarks (vLLM and llama.cpp accept it too)
    # llama-server's name: false neither reuses cached prompt cells nor leaves any behind
    cache_prompt: bool = True
    # accepted so standard clients work; they change nothing for a local server
    user: str | None = Field(default=None, max_length=256)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """`"temperature": null` is the default temperature, as in OpenAI's API."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @model_validator(mode="after")
    def _no_unknown_fields(self) -> SamplingRequest:
        for name in self.model_extra or {}:
            if name in UNSUPPORTED_FIELDS:
                raise ValueError(f"`{name}` is not supported by this server")
            raise ValueError(f"Unrecognized request argument supplied: {name}")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        bad = next((key for key in value or {} if not re.fullmatch(TOKEN_KEY, key)), None)
        if bad is not None:
            raise ValueError(f"keys must be token ids, got {bad!r}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def json_schema_text(self) -> str | None:
        """Schema to enforce as JSON text; "" means any JSON object; None means free text."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object" or fmt.json_schema is None:
            return ""
        return json.dumps(fmt.json_schema.schema_ or {"type": "object"})

    @property
    def has_images(self) -> bool:
        """Image parts in the request (a completion's prompt has none)."""
        return False

    def token_logit_bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str = Field(max_length=MAX_IMAGE_URL)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    """An image in a message: accepted so `auto` can route it (to a model that reads images);
    a model that cannot is a 400 naming it, never a silent drop."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL


UserPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names
# Templates print call ids as they are: no characters that could spell a control token.
CALL_ID = r"^[A-Za-z0-9_.:=+/-]{1,256}$"
MAX_TOOLS = 128  # OpenAI's limit


_TOP_LEVEL_ALTERNATIVES = frozenset({"anyOf", "oneOf", "allOf", "enum", "const", "$ref"})
_TYPE_NAMES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})


def _check_type_names(node: Any) -> None:
    """Every `type` keyword names JSON types (templates print them as they are)."""
    if isinstance(node, list):
        for item in node:
            _check_type_names(item)
    elif isinstance(node, dict):
        given = node.get("type")
        names = [given] if isinstance(given, str) else given if isinstance(given, list) else []
        if any(not isinstance(n, str) or n not in _TYPE_NAMES for n in names):
            raise ValueError(f"`type` must name JSON types ({', '.join(sorted(_TYPE_NAMES))})")
        for value in node.values():
            _check_type_names(value)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(default=None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # calls always match the schema here, strict or not

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            combined = _TOP_LEVEL_ALTERNATIVES & value.keys()
            if value.get("type", "object") != "object" or combined:
                raise ValueError(
                    'function parameters must be a JSON schema of "type": "object" (no '
                    "top-level anyOf, oneOf, allOf, enum, const or $ref)"
                )
            _check_schema_node(value, 0)
            _check_type_names(value)
        return value

    def parameters_schema(self) -> dict[str, Any]:
        """The parameters' schema; a function without one takes an empty object."""
        return self.parameters or {"type": "object", "properties": {}}


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str
    # what the `openai` client's parse and stream helpers add to a message it is handed back
    parsed_arguments: Any = None


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(pattern=CALL_ID)
    type: Literal["function"]
    function: FunctionCall
    index: int | None = None  # the `openai` client's stream helper keeps the delta's index


ROLES_WITHOUT_CALL_ID = ["system", "developer", "user", "assistant"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "allOf": [
                required_unless("content", "role", ["assistant"]),
                required_unless("tool_call_id", "role", ROLES_WITHOUT_CALL_ID),
                {  # only an assistant message carries calls
                    "anyOf": [
                        {"properties": {"role": {"const": "assistant"}}},
                        {"properties": {"tool_calls": {"type": ["array", "null"], "maxItems": 0}}},
                    ]
                },
            ]
        },
    )
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[UserPart] | None = None
    name: str | None = Field(default=None, pattern=FUNCTION_NAME)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, pattern=CALL_ID)
    refusal: str | None = None  # echoed back by clients that replay an assistant message
    # what the `openai` client's parse and stream helpers add to a message it is handed back
    parsed: Any = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError("`content` is required for this role")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a `tool` message needs the `tool_call_id` it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry `tool_calls`")
        return self

    def as_template_input(self) -> dict[str, Any]:
        """The message as chat templates take it: text content, calls and ids as given."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            message["name"] = self.name
        return message

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""

    @property
    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(
            isinstance(part, ImagePart) for part in self.content
        )


class Prediction(BaseModel):
    """Predicted output: a hint for speed that never changes the answer, so it is accepted."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["content"]
    content: str | list[TextPart]


def _tool_rules(schema: dict[str, Any]) -> None:
    """Publish the model validator's rules: `tool_choice` "required" or a named function needs
    `tools`; a structured `response_format` does not go with tools the model may call."""
    _nulls_allowed(schema)
    no_tools = {"properties": {"tools": {"type": ["array", "null"], "maxItems": 0}}}
    schema["allOf"] = [
        {
            "anyOf": [
                {"properties": {"tool_choice": {"enum": ["none", "auto", None]}}},
                {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
            ]
        },
        {
            "anyOf": [
                no_tools,
                {"properties": {"tool_choice": {"const": "none"}}},
                {
                    "properties": {
                        "response_format": {
                            "anyOf": [{"type": "null"}, {"properties": {"type": {"const": "text"}}}]
                        }
                    }
                },
            ]
        },
    ]


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_tool_rules)

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # no-op values only (see NO_OP_VALUES)
    functions: NoTools | None = None
    function_call: Literal["none", "auto"] | None = None
    modalities: list[Literal["text"]] | None = None
    prediction: Prediction | None = None

    @model_validator(mode="after")
    def _calls_need_tools(self) -> ChatCompletionRequest:
        if self.call_required and not self.tools:
            raise ValueError("tool_choice: a call is required, but there are no `tools`")
        structured = self.response_format is not None and self.response_format.type != "text"
        if structured and self.callable_tools():
            raise ValueError(
                "response_format (json_object, json_schema) cannot be combined with tools the "
                'model may call yet: send one or the other, or tool_choice "none"'
            )
        return self

    def tools_problem(self) -> tuple[str, str, str] | None:
        """What JSON Schema cannot say is wrong with the tools: (message, param, code)."""
        names = [tool.function.name for tool in self.tools or ()]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            return f"two tools are named `{duplicate}`", "tools", "duplicate_tool_name"
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            message = f"tool_choice names `{choice.function.name}`, which is not in tools"
            return message, "tool_choice", "unknown_tool"
        return None

    def callable_tools(self) -> list[Tool]:
        """The tools the model may call: none for `tool_choice: "none"`, one for a named one."""
        choice = self.tool_choice
        if not self.tools or choice == "none":
            return []
        if isinstance(choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == choice.function.name]
        return list(self.tools)

    @property
    def has_images(self) -> bool:
        return any(m.has_images for m in self.messages)

    @property
    def call_required(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: Annotated[
        str | list[TokenIdValue] | list[str] | list[list[TokenIdValue]],
        WithJsonSchema(PROMPT_SCHEMA),
    ]
    logprobs: TopLogprobs | None = None
    # no-op values only (see NO_OP_VALUES)
    echo: _only(False) | None = None
    best_of: _only(1) | None = None
    suffix: Literal[""] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts_in_bounds(cls, value: Any) -> Any:
        """A string, token ids, or a list of either (one choice, or `n`, per prompt)."""
        prompts = value if _is_prompt_list(value) else [value]
        if not prompts:
            raise ValueError("prompt must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        for prompt in prompts:
            if len(prompt) == 0:
                raise ValueError("prompt must not be empty")
            if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
            if isinstance(prompt, list) and len(prompt) > MAX_PROMPT_TOKENS:
                raise ValueError(f"prompt has more than {MAX_PROMPT_TOKENS} token ids")
        return value

    @property
    def prompts(self) -> list[str | tuple[int, ...]]:
        """Every prompt of the request, in order; choices are numbered prompt by prompt."""
        listed = self.prompt if _is_prompt_list(self.prompt) else [self.prompt]
        return [p if isinstance(p, str) else tuple(p) for p in listed]

    @property
    def token_limit(self) -> int | None:
        # OpenAI's legacy completions default to 16 tokens.
        return self.max_tokens if self.max_tokens is not None else 16

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs


MAX_EMBEDDING_INPUTS = 2048  # per /v1/embeddings request, as OpenAI
MAX_DIMENSIONS = 1 << 16
_TOKEN_IDS = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID},
    "minItems": 1,
    "maxItems": MAX_PROMPT_TOKENS,
}
_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS}
EMBEDDING_INPUT_SCHEMA = {
    "anyOf": [
        _TEXT,
        _TOKEN_IDS,
        {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS},
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS},
    ]
}


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings body. Strict types, null means the default, other fields are refused
    by name (as for completions)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=256)
    input: Annotated[
        str | list[TokenIdValue] | list[str] | list[list[TokenIdValue]],
        WithJsonSchema(EMBEDDING_INPUT_SCHEMA),
    ]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1, le=MAX_DIMENSIONS), WHOLE] | None = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("input")
    @classmethod
    def _inputs_in_bounds(cls, value: Any) -> Any:
        """Texts or token ids: one, or a list of up to MAX_EMBEDDING_INPUTS; none empty."""
        if value == []:
            raise ValueError("input must hold at least one text or token array")
        inputs = value if _is_prompt_list(value) else [value]
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        for index, item in enumerate(inputs):
            if len(item) == 0:
                raise ValueError(f"input[{index}] is empty")
            if isinstance(item, str) and len(item) > MAX_PROMPT_CHARS:
                raise ValueError(f"input[{index}] is longer than {MAX_PROMPT_CHARS} characters")
            if isinstance(item, list) and len(item) > MAX_PROMPT_TOKENS:
                raise ValueError(f"input[{index}] has more than {MAX_PROMPT_TOKENS} token ids")
        return value

    @property
    def inputs(self) -> tuple[str | tuple[int, ...], ...]:
        """Every input, in order: the response's `index` is its place here."""
        listed = self.input if _is_prompt_list(self.input) else [self.input]
        return tuple(item if isinstance(item, str) else tuple(item) for item in listed)
