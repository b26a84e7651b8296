"""OpenAI request bodies, validated with pydantic; fields we do not serve are refused by name.

OpenAI itself answers 400 to an argument it does not know, and a client that sends `tools` must
learn we ignore them rather than get a silently tool-less answer.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256

# OpenAI fields we understand but do not implement yet: refused with a message naming them.
UNSUPPORTED_FIELDS = frozenset(
    {
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "parallel_tool_calls",
        "audio",
        "modalities",
        "prediction",
        "web_search_options",
        "reasoning_effort",
        "suffix",
        "best_of",
        "echo",
    }
)
# OpenAI fields that change nothing for a local server; accepted so standard clients work.
IGNORED_FIELDS = frozenset({"user", "store", "metadata", "service_tier"})

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


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
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None

    @field_validator("schema_")
    @classmethod
    def _safe_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_schema_node(value, 0)
        return value


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`json_schema` is required when type is 'json_schema'")
        return self


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    temperature: FiniteFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: FiniteFloat = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1 << 20)
    min_p: FiniteFloat = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = None
    presence_penalty: FiniteFloat = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: FiniteFloat = Field(default=0.0, ge=-2.0, le=2.0)
    repeat_penalty: FiniteFloat = Field(default=1.0, gt=0.0, le=10.0)
    logit_bias: dict[str, FiniteFloat] | None = None
    n: int = Field(default=1, ge=1, le=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False  # extension used by benchmarks (vLLM and llama.cpp accept it too)

    @model_validator(mode="after")
    def _no_unknown_fields(self) -> SamplingRequest:
        for name in self.model_extra or {}:
            if name in UNSUPPORTED_FIELDS:
                raise ValueError(f"`{name}` is not supported by this server")
            if name not in IGNORED_FIELDS:
                raise ValueError(f"Unrecognized request argument supplied: {name}")
        return self

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop strings are limited to {MAX_STOP_LENGTH} characters")
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError("biases must be between -100 and 100")
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

    def token_logit_bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError("`content` is required for this role")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] = Field(max_length=1 << 20)
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported")
            value = value[0]
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        return value

    @property
    def token_limit(self) -> int | None:
        # OpenAI's legacy completions default to 16 tokens.
        return self.max_tokens if self.max_tokens is not None else 16

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs
