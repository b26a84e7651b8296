"""Which expert each conversation went to, so its later turns go there too.

A conversation is known by a hash of its system prompt and first user message: every later turn
repeats both, so the turn lands on the model whose prefix cache already holds the conversation,
and the voice does not change mid-chat. Bounded (least recently used forgotten first) and
expiring, so memory stays flat however many conversations pass.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


def conversation_key(client: str, system: Iterable[str], first_user: str) -> bytes:
    """16 bytes naming a conversation: whose it is (one client's conversations never steer
    another's), its system prompt(s) and its first user message."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(client.encode("utf-8", "surrogatepass"))
    digest.update(b"\x02")
    for text in system:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")  # ("ab", "c") and ("a", "bc") differ
    digest.update(b"\x01")
    digest.update(first_user.encode("utf-8", "surrogatepass"))
    return digest.digest()


@dataclass(frozen=True)
class Placement:
    """Where a conversation went, and the rule that first sent it there."""

    model_id: str
    rule: str


class StickyMap:
    """Conversation key -> placement, at most `capacity` of them, each kept `ttl` seconds after
    its last turn."""

    def __init__(
        self, capacity: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[Placement, float]] = OrderedDict()

    def count(self) -> int:
        """Conversations remembered and not yet expired."""
        self._expire(self._clock())
        return len(self._entries)

    def get(self, key: bytes) -> Placement | None:
        """The conversation's placement if it is remembered and fresh (its timer restarts)."""
        found = self._entries.get(key)
        if found is None:
            return None
        placement, expires = found
        now = self._clock()
        if expires <= now:
            del self._entries[key]
            return None
        self._entries[key] = (placement, now + self.ttl)
        self._entries.move_to_end(key)
        return placement

    def put(self, key: bytes, placement: Placement) -> None:
        now = self._clock()
        self._entries[key] = (placement, now + self.ttl)
        self._entries.move_to_end(key)
        self._expire(now)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def _expire(self, now: float) -> None:
        """Drop expired entries from the old end: the least recently used expire first."""
        while self._entries:
            _, (_, expires) = next(iter(self._entries.items()))
            if expires > now:
                return
            self._entries.popitem(last=False)
