"""Reading tool calls out of generated text, as it streams.

The grammar guarantees the layout, so the reader can be simple and exact: text before the calls
is content; each call's name is sent as soon as it is read, then its arguments as they are
generated (fragments that join into the call's JSON arguments, as OpenAI streams them). Text
that might be the start of the calls is held back until it is known not to be.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

from multiserve.tools.layouts import LLAMA3, RESPONSE_OPENING, ToolLayout

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An id in OpenAI's form, `call_` and 24 letters or digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass(frozen=True)
class CallDelta:
    """News of one call: its start (id and name), or more of its arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class Parsed:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


_CONTENT, _CALLS, _SEEK, _NAME, _ARGUMENTS, _RESPONSE, _DONE = range(7)


class ToolCallReader:
    """One choice's reader: `feed` it text as it comes, then `finish`."""

    def __init__(self, layout: ToolLayout) -> None:
        self.layout = layout
        self.calls: list[ToolCall] = []
        self._held = ""
        self._state = _CONTENT
        self._decided = layout.trigger is not None  # eager layouts decide on the first chars
        self._name = re.compile(
            r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"'
            + re.escape(layout.arguments_key)
            + r'"\s*:\s*'
        )
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> Parsed:
        self._held += text
        out = Parsed()
        while self._step(out):
            pass
        return out

    def finish(self) -> Parsed:
        """What is left when the choice ends: held text that turned out to be content."""
        out = self.feed("")
        if self._state == _CONTENT:
            out.content += self._held
        elif self._state == _NAME and not self.calls and self._held.strip():
            # opened like calls but never became one (text the grammar did not hold): the text
            # is the answer, not something to drop
            out.content += self.layout.start + self._held
        self._held = ""
        return out

    # -- states --------------------------------------------------------------------------------

    def _step(self, out: Parsed) -> bool:
        """Advance through the held text; False when more text is needed."""
        if self._state == _CONTENT:
            return self._content(out)
        if self._state == _SEEK:
            start = self._held.find("{")
            if start < 0:
                self._held = ""
                return False
            self._held = self._held[start:]
            self._state = _NAME
            return True
        if self._state == _NAME:
            match = self._name.match(self._held)
            if match is None:
                return False
            name = json.loads(f'"{match.group(1)}"')
            call = ToolCall(new_call_id(), name)
            self.calls.append(call)
            out.calls.append(CallDelta(len(self.calls) - 1, "", call.id, name))
            self._held = self._held[match.end() :]
            self._state = _ARGUMENTS
            return True
        if self._state == _ARGUMENTS:
            return self._arguments(out)
        if self._state == _RESPONSE:
            return self._response(out)
        self._held = ""
        return False

    def _content(self, out: Parsed) -> bool:
        held = self._held
        if not self._decided:
            return self._decide(out)
        start = self.layout.start
        at = held.find(start)
        if at >= 0:
            out.content += held[:at]
            self._held = held[at + len(start) :]
            self._state = _SEEK
            return True
        keep = next(
            (
                n
                for n in range(min(len(held), len(start) - 1), 0, -1)
                if start.startswith(held[-n:])
            ),
            0,
        )
        out.content += held[: len(held) - keep]
        self._held = held[len(held) - keep :]
        return False

    def _decide(self, out: Parsed) -> bool:
        """Eager layouts: does the answer open as calls, as a `response`, or as plain text?"""
        held = self._held.lstrip()
        openings = [(self.layout.start or "{", _SEEK)]
        if self.layout.response_envelope:
            openings.append((RESPONSE_OPENING + '"', _RESPONSE))
        for opening, state in openings:
            if held.startswith(opening):
                self._decided = True
                self._held = held[len(opening) :] if self.layout is not LLAMA3 else held
                self._state = state
                return True
        if any(opening.startswith(held) for opening, _ in openings):
            return False  # too early to tell
        self._decided = True
        self.layout = _NO_CALLS
        return True

    def _arguments(self, out: Parsed) -> bool:
        held = self._held.lstrip() if self._depth == 0 else self._held
        end = None
        for i, char in enumerate(held):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
        piece = held if end is None else held[:end]
        if piece:
            self.calls[-1].arguments += piece
            out.calls.append(CallDelta(len(self.calls) - 1, piece))
        self._held = "" if end is None else held[end:]
        if end is None:
            return False
        self._state = _SEEK
        return True

    def _response(self, out: Parsed) -> bool:
        """The generic layout's plain answer: a JSON string, decoded as it comes."""
        held = self._held
        i = 0
        text = []
        while i < len(held):
            char = held[i]
            if char == '"':
                self._state = _DONE
                break
            if char != "\\":
                text.append(char)
                i += 1
                continue
            size = _escape_size(held, i)
            if size == 0:
                break  # an escape not complete yet
            text.append(_unescape(held[i : i + size]))
            i += size
        out.content += "".join(text)
        self._held = held[i:] if self._state != _DONE else ""
        return False


def _escape_size(text: str, at: int) -> int:
    """Length of the JSON escape at `at` (a surrogate pair counts as one), or 0 if the text
    does not hold all of it yet."""
    if text[at + 1 : at + 2] != "u":
        return 2 if at + 2 <= len(text) else 0
    if at + 6 > len(text):
        return 0
    if not 0xD800 <= int(text[at + 2 : at + 6], 16) <= 0xDBFF:
        return 6
    after = text[at + 6 : at + 8]  # a high surrogate: is its low half next?
    if len(after) < 2 and "\\u".startswith(after):
        return 0
    if after != "\\u":
        return 6  # a lone high surrogate
    return 12 if at + 12 <= len(text) else 0


def _unescape(escape: str) -> str:
    """The character(s) of one JSON escape; a lone surrogate (not valid text) becomes U+FFFD."""
    text = json.loads(f'"{escape}"')
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


# An eager layout whose answer turned out to be plain text: nothing more to look for.
_NO_CALLS = ToolLayout("none", "", "\0", "", "", "", trigger="\0")
