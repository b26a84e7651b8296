"""The `[router]` section: ordered rules that send `"model": "auto"` requests to an expert.

Validated at start, so a typo in a pattern or a model name is an error naming its rule, never a
surprise on the first routed request.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AUTO_MODEL = "auto"  # the model name a client sends to be routed
RESERVED_RULE_NAMES = frozenset({"default", "sticky"})  # what a decision without a rule says

LanguageCode = Annotated[str, Field(pattern=r"^[a-z]{2,3}$")]
ModelName = Annotated[str, Field(min_length=1, max_length=128)]


class RouteRule(BaseModel):
    """A condition and where it sends a request. Every condition given must hold; a rule with
    no condition matches every request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="rule", max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelName | tuple[ModelName, ...] = Field(
        description="target model, or models in order of preference"
    )
    languages: tuple[LanguageCode, ...] | None = Field(
        default=None, description="the last user message is in one of these (ISO 639-1)"
    )
    not_languages: tuple[LanguageCode, ...] | None = Field(
        default=None, description="the last user message is in a detected language not listed"
    )
    keywords: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...] = Field(
        default=(),
        description="words in the last user message (any case; a trailing * matches a prefix)",
    )
    patterns: tuple[Annotated[str, Field(min_length=1, max_length=1000)], ...] = Field(
        default=(), description="regular expressions searched in the last user message"
    )
    tools: bool | None = Field(default=None, description="the request offers callable tools")
    json_schema: bool | None = Field(
        default=None, description="the request asks for JSON (response_format)"
    )
    min_tokens: int | None = Field(
        default=None, ge=0, description="the prompt is estimated at this many tokens or more"
    )
    max_tokens: int | None = Field(
        default=None, ge=0, description="the prompt is estimated at this many tokens or fewer"
    )
    images: bool | None = Field(default=None, description="the messages carry image parts")
    prefer_loaded: bool = Field(
        default=False, description="among the targets, a loaded model before a cold one"
    )
    fallthrough: bool = Field(
        default=False,
        description="a target refusing (queue full, unavailable) passes to the next target",
    )

    @field_validator("model", mode="after")
    @classmethod
    def _targets_are_listed_once(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        targets = (value,) if isinstance(value, str) else value
        if not targets:
            raise ValueError("a rule needs at least one target model")
        if len(set(targets)) != len(targets):
            raise ValueError("a target model is listed twice")
        return value

    @model_validator(mode="after")
    def _patterns_compile(self) -> RouteRule:
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"pattern {pattern!r} is not a regular expression: {exc}"
                ) from None
        if self.languages and self.not_languages:
            raise ValueError("give `languages` or `not_languages`, not both")
        return self

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.model,) if isinstance(self.model, str) else self.model

    @property
    def states_needs(self) -> bool:
        """The rule is about what a request needs, not what it says: it outranks stickiness."""
        needs = (self.tools, self.json_schema, self.images, self.min_tokens, self.max_tokens)
        return any(need is not None for need in needs)


class RouterConfig(BaseModel):
    """Rules in order (the first that matches wins), a default, and conversation stickiness."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: ModelName = Field(description="the model when no rule matches")
    rules: tuple[RouteRule, ...] = ()
    sticky: bool = Field(
        default=True, description="later turns of a conversation go where its first turn went"
    )
    sticky_ttl: float = Field(
        default=3600.0, gt=0, description="seconds a conversation is remembered after its turn"
    )
    sticky_max: int = Field(
        default=65536, ge=1, le=10_000_000, description="conversations remembered at most"
    )

    @model_validator(mode="before")
    @classmethod
    def _rules_are_named(cls, data: object) -> object:
        """An unnamed rule is `rule1`, `rule2`, ... by its place in the list."""
        if isinstance(data, dict) and isinstance(data.get("rules"), list):
            rules = [
                {"name": f"rule{i}", **rule} if isinstance(rule, dict) else rule
                for i, rule in enumerate(data["rules"], start=1)
            ]
            return {**data, "rules": rules}
        return data

    @model_validator(mode="after")
    def _rule_names_differ(self) -> RouterConfig:
        names = [rule.name for rule in self.rules]
        for name in names:
            if names.count(name) > 1 or name in RESERVED_RULE_NAMES:
                raise ValueError(f"rule name {name!r} is used twice or is reserved")
        return self

    def model_names(self) -> list[tuple[str, str]]:
        """(rule name, model name) for every target, for checking them against the models."""
        pairs = [(rule.name, target) for rule in self.rules for target in rule.targets]
        return [*pairs, ("default", self.default)]
