"""Which replica of a model takes a request: fewest outstanding requests, with prefix affinity.

A replica keeps the prompts it has read in its KV cache, so the next turn of a conversation (the
same prompt plus an answer and a new message) reads only its new part if it returns to the same
replica, and all of it anywhere else. So the router remembers, for the prompts it has routed,
which replicas got each prefix (digests of the prompt at fixed block boundaries, newest in a
bounded LRU), and sends a request to the least loaded replica holding its longest known prefix.
When that prefix is a whole earlier prompt (the request continues a conversation), the replica
may have up to `slack` more requests outstanding than the least loaded one; when it is only part
of one (a system prompt many conversations share), it only breaks ties, so new conversations
still spread. Anything else goes to the least loaded replica (ties in turn). This is the shape
of Ray Serve's prefix-aware router and of vLLM's production-stack router, on prompt text.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from multiserve.engine.protocol import Embed, Generate, TextPrompt

BLOCK_CHARS = 32  # a prefix is known at every 32 characters of prompt text ...
BLOCK_TOKENS = 8  # ... or every 8 tokens of a token-id prompt
MAX_BLOCKS = 1024  # and over at most the first 1,024 blocks (32k characters)
MAX_PREFIXES = 1 << 16  # prefixes remembered per model (LRU)
MAX_ENDINGS = 8  # earlier prompts remembered per prefix, for telling a next turn


@dataclass(frozen=True)
class Prompt:
    """A request's prompt as bytes, and the digests of its prefixes at each block boundary."""

    data: bytes
    keys: list[bytes]

    @classmethod
    def of(cls, request: Generate | Embed) -> Prompt:
        if not isinstance(request, Generate):
            return cls(b"", [])  # an embedding keeps nothing in a cache
        prompt = request.prompt
        if isinstance(prompt, TextPrompt):
            text = "".join(("\x00" if s.special else "\x01") + s.text for s in prompt.segments)
            data, block = text.encode("utf-8", "surrogatepass"), BLOCK_CHARS
        else:
            data, block = b"".join(i.to_bytes(4, "little") for i in prompt.ids), BLOCK_TOKENS * 4
        keys, digest = [], b""
        for start in range(0, min(len(data), block * MAX_BLOCKS) - block + 1, block):
            digest = _digest(digest + data[start : start + block])
            keys.append(digest)
        return cls(data, keys)

    def continues(self, ending: tuple[int, bytes]) -> bool:
        """Whether this prompt starts with the whole earlier prompt `ending` (length, digest)."""
        length, digest = ending
        return len(self.data) >= length and _digest(self.data[:length]) == digest


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class _Prefix:
    holders: set[int] = field(default_factory=set)  # replicas that read it
    endings: list[tuple[int, bytes]] = field(default_factory=list)  # prompts whose last block
    # this is: (length, digest); a request that starts with one of them is its next turn


@dataclass
class ReplicaRouter:
    """Picks a replica per request (see the module's docstring); counts what it did."""

    slack: int
    _prefixes: OrderedDict[bytes, _Prefix] = field(default_factory=OrderedDict)
    _turn: itertools.count = field(default_factory=itertools.count)

    def pick(self, request: Generate | Embed, loads: list[int | None]) -> int:
        """The replica for `request`; `loads` are each replica's outstanding requests, None for
        a replica that cannot take any. At least one must be able to."""
        prompt = Prompt.of(request)
        least = min(load for load in loads if load is not None)
        choice = None
        for key in reversed(prompt.keys):
            if (prefix := self._prefixes.get(key)) is None:
                continue
            next_turn = any(prompt.continues(ending) for ending in prefix.endings)
            allowed = least + (self.slack if next_turn else 0)
            near = [i for i in prefix.holders if loads[i] is not None and loads[i] <= allowed]
            if near:
                choice = min(near, key=lambda i: (loads[i], i))
                break
        if choice is None:
            candidates = [i for i, load in enumerate(loads) if load == least]
            choice = candidates[next(self._turn) % len(candidates)]
        self._remember(prompt, choice)
        return choice

    def forget(self, replica: int) -> None:
        """A replica lost its cache (its worker died): it holds no prefix any more."""
        for prefix in self._prefixes.values():
            prefix.holders.discard(replica)

    def _remember(self, prompt: Prompt, replica: int) -> None:
        for key in prompt.keys:
            self._prefixes.setdefault(key, _Prefix()).holders.add(replica)
            self._prefixes.move_to_end(key)
        if prompt.keys:
            endings = self._prefixes[prompt.keys[-1]].endings
            endings.append((len(prompt.data), _digest(prompt.data)))
            del endings[:-MAX_ENDINGS]
        while len(self._prefixes) > MAX_PREFIXES:
            self._prefixes.popitem(last=False)
