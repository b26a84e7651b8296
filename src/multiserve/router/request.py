"""What the router looks at in a request: no tokenizer, no model, nothing slow."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from multiserve.router.keywords import words_of

# Rules read at most this much of the last user message: keeps a rule's pattern and the
# language detector fast on a pasted 100 kB document (the start says what it is about).
TEXT_LIMIT = 1000


@dataclass(frozen=True)
class RouteRequest:
    """The parts of a chat or completion request that rules can test."""

    text: str  # the last user message (a completion: its prompt), cut to TEXT_LIMIT
    token_estimate: int = 0  # the whole prompt's
    tools: bool = False  # callable tools offered
    json_schema: bool = False  # response_format asks for JSON
    images: bool = False  # an image part in any message
    conversation: bytes | None = None  # stickiness key; None: no conversation to keep together
    later_turn: bool = False  # the conversation has an answer already: not its first turn

    @cached_property
    def words(self) -> list[str]:
        """The text's words, cut once for every rule's keywords."""
        return words_of(self.text)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate that errs long: about four ASCII characters per token, and a
    token for every other character (CJK is about one; accented Latin and Cyrillic less)."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return ascii_chars // 4 + (len(text) - ascii_chars)
