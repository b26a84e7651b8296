"""What each sequence slot's KV cells hold, and the bounded prompt cache in host memory.

On a CPU, reading the prompt is the expensive part of a chat turn: the conversation so far and a
shared system prompt come back with every request. A slot keeps its cells after its request ends;
`SlotTable` records which tokens they hold so a new request can start from the longest common
prefix. `HostCache` keeps the cells of long prompts evicted from slots, as llama.cpp sequence
state, so they can come back without being read again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass
class Slot:
    """One sequence id of the context: the tokens whose cells it holds, at positions 0..n-1."""

    seq: int
    capacity: int
    tokens: np.ndarray = field(init=False)
    length: int = 0
    busy: bool = False
    last_used: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = np.zeros(self.capacity, np.int32)

    @property
    def held(self) -> np.ndarray:
        return self.tokens[: self.length]

    def append(self, tokens: list[int] | np.ndarray) -> None:
        end = self.length + len(tokens)
        self.tokens[self.length : end] = tokens
        self.length = end

    def set(self, tokens: np.ndarray) -> None:
        self.length = len(tokens)
        self.tokens[: self.length] = tokens


class SlotTable:
    """Every slot, and the choice of which to give a new request."""

    def __init__(self, n_slots: int, capacity: int) -> None:
        self.slots = [Slot(seq, capacity) for seq in range(n_slots)]

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if not s.busy]

    def best_idle(self, prompt: np.ndarray) -> tuple[Slot, int]:
        """The idle slot sharing the longest prefix with `prompt`; ties go to the least recently
        used, so the newest caches survive longest. There must be an idle slot."""
        best, best_lcp = None, -1
        for slot in sorted(self.idle(), key=lambda s: s.last_used):
            lcp = common_prefix(slot.held, prompt)
            if lcp > best_lcp:
                best, best_lcp = slot, lcp
        assert best is not None
        return best, best_lcp

    def cheapest_idle(self, excluding: set[int]) -> Slot:
        """The idle slot whose cache is worth least: an empty one, else the least recently used."""
        return min(
            (s for s in self.idle() if s.seq not in excluding),
            key=lambda s: (s.length > 0, s.last_used),
        )


@dataclass
class HostEntry:
    tokens: np.ndarray
    state: bytearray


class HostCache:
    """Saved sequence states of long prompts, least recently used out first, within a byte bound.

    Lives in the worker, so it goes when the model unloads or its worker restarts.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self._entries: OrderedDict[int, HostEntry] = OrderedDict()
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, prompt: np.ndarray) -> tuple[HostEntry | None, int]:
        best, best_lcp = None, 0
        for entry in self._entries.values():
            lcp = common_prefix(entry.tokens, prompt)
            if lcp > best_lcp:
                best, best_lcp = entry, lcp
        return best, best_lcp

    def covers(self, tokens: np.ndarray) -> bool:
        """Whether some entry already holds all of `tokens` (as its prefix)."""
        return any(
            len(e.tokens) >= len(tokens) and common_prefix(e.tokens, tokens) == len(tokens)
            for e in self._entries.values()
        )

    def put(self, tokens: np.ndarray, state: bytearray) -> None:
        """Keep a state; entries it extends are dropped, and old ones until it fits."""
        if len(state) > self.limit_bytes:
            return
        for key, entry in list(self._entries.items()):
            if common_prefix(entry.tokens, tokens) == len(entry.tokens):
                self._drop(key)
        while self.bytes + len(state) > self.limit_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[self._next_id] = HostEntry(tokens.copy(), state)
        self._next_id += 1
        self.bytes += len(state)

    def touch(self, entry: HostEntry) -> None:
        """Mark an entry as just used, so it is the last to go."""
        for key, value in self._entries.items():
            if value is entry:
                self._entries.move_to_end(key)
                return

    def _drop(self, key: int) -> None:
        self.bytes -= len(self._entries.pop(key).state)
