"""A rule's conditions compiled once, tested against a request in microseconds.

Each test returns why it holds (for the `x-multiserve-route` header) or None. The language is
detected at most once per request, and only when a rule that reaches it needs it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from multiserve.router.config import RouteRule
from multiserve.router.keywords import KeywordMatcher
from multiserve.router.request import RouteRequest


def _said(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


class CompiledRule:
    """A config rule ready to test: keywords and patterns compiled, conditions in cheap-first
    order (the language last: it is the one that costs)."""

    def __init__(self, rule: RouteRule) -> None:
        self.rule = rule
        self.name = rule.name
        self._keywords = KeywordMatcher(rule.keywords)
        self._patterns = [re.compile(p) for p in rule.patterns]
        self.needs_language = rule.languages is not None or rule.not_languages is not None

    def match(self, request: RouteRequest, language: Callable[[], str | None]) -> str | None:
        """Why this rule matches `request` (every condition it sets holds), or None."""
        reasons: list[str] = []
        for check in (self._flags, self._size, self._text):
            reason = check(request)
            if reason is None:
                return None
            if reason:
                reasons.append(reason)
        if self.needs_language:
            reason = self._language(language())
            if reason is None:
                return None
            reasons.append(reason)
        return ", ".join(reasons) or "always"

    def _flags(self, request: RouteRequest) -> str | None:
        rule, reasons = self.rule, []
        for wanted, present, name in (
            (rule.tools, request.tools, "tools"),
            (rule.json_schema, request.json_schema, "json"),
            (rule.images, request.images, "images"),
        ):
            if wanted is None:
                continue
            if wanted != present:
                return None
            reasons.append(name if present else f"no {name}")
        return ", ".join(reasons)

    def _size(self, request: RouteRequest) -> str | None:
        rule, tokens = self.rule, request.token_estimate
        if rule.min_tokens is not None and tokens < rule.min_tokens:
            return None
        if rule.max_tokens is not None and tokens > rule.max_tokens:
            return None
        if rule.min_tokens is None and rule.max_tokens is None:
            return ""
        return f"~{tokens} tokens"

    def _text(self, request: RouteRequest) -> str | None:
        if not self._keywords and not self._patterns:
            return ""
        if self._keywords and (found := self._keywords.find(request.text, request.words)):
            return f"keyword {_said(found)!r}"
        for number, pattern in enumerate(self._patterns, start=1):
            if (found := pattern.search(request.text)) is not None:
                quoted = f" {_said(found.group(0))!r}" if found.group(0) else ""
                return f"pattern {number}{quoted}"
        return None

    def _language(self, language: str | None) -> str | None:
        rule = self.rule
        if language is None:  # too short or too mixed to tell: neither listed nor not listed
            return None
        if rule.languages is not None:
            return f"language {language}" if language in rule.languages else None
        assert rule.not_languages is not None
        return None if language in rule.not_languages else f"language {language} (not excluded)"
