"""Incremental detokenization: token bytes in, safe text deltas out.

Two things must never reach a client: half of a multi-byte UTF-8 character (byte-fallback tokens
split characters across tokens) and the beginning of a stop string that later completes. Text is
held back until it can no longer become either.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class IncrementalDetokenizer:
    """Decodes one choice's token pieces and cuts the output at the first stop string."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stop if s)
        self._held = ""

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Add one token's bytes; return the text now safe to emit and whether a stop string hit.

        After a hit the returned text ends right before the stop string and the rest is dropped.
        """
        self._held += self._decoder.decode(piece)
        if not self._stops:
            text, self._held = self._held, ""
            return text, False
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            text, self._held = self._held[: min(hits)], ""
            return text, True
        keep = self._partial_stop_suffix()
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return text, False

    def flush(self) -> str:
        """Text still held when the choice ends without a stop string (length, EOS)."""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the held text that begins some stop string."""
        held = self._held
        for length in range(min(len(held), max(map(len, self._stops)) - 1), 0, -1):
            tail = held[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
