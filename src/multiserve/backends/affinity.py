"""Which replica of a model takes a request: fewest outstanding requests, with prefix affinity.

A replica keeps the prompts it has read in its KV cache, so the next turn of a conversation (the
same prompt plus an answer and a new message) reads only its new part if it returns to the same
replica, and all of it anywhere else. So the router remembers, for the prompts it has routed,
which replicas got each prefix (digests of the prompt at fixed block boundaries, newest in a
bounded LRU), and sends a request to the least loaded replica holding its longest known prefix,
if that replica is within `slack` requests of the least loaded one. The slack applies only when
the prefix is most of the prompt (a conversation's next turn); a prefix that is a small part of
it (a system prompt many conversations share) only breaks ties, so new conversations still
spread. Anything else goes to the least loaded replica (ties in turn). This is the shape of Ray
Serve's prefix-aware router and of vLLM's production-stack router, on prompt text.
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
MOST_OF_IT = 0.5  # a prefix this share of the prompt's blocks may outweigh load (by the slack)


def prefix_keys(request: Generate | Embed) -> tuple[list[bytes], float]:
    """Digests of the request's prompt at each block boundary, shortest prefix first; and the
    prompt's length in blocks (a last partial block counted in part)."""
    if not isinstance(request, Generate):
        return [], 0.0  # an embedding keeps nothing in a cache
    prompt = request.prompt
    if isinstance(prompt, TextPrompt):
        text = "".join(("\x00" if s.special else "\x01") + s.text for s in prompt.segments)
        data, block = text.encode("utf-8", "surrogatepass"), BLOCK_CHARS
    else:
        data, block = b"".join(i.to_bytes(4, "little") for i in prompt.ids), BLOCK_TOKENS * 4
    keys, digest = [], b""
    for start in range(0, min(len(data), block * MAX_BLOCKS) - block + 1, block):
        digest = hashlib.blake2b(digest + data[start : start + block], digest_size=16).digest()
        keys.append(digest)
    return keys, len(data) / block


@dataclass
class ReplicaRouter:
    """Picks a replica per request (see the module's docstring); counts what it did."""

    slack: int
    _holders: OrderedDict[bytes, set[int]] = field(default_factory=OrderedDict)
    _turn: itertools.count = field(default_factory=itertools.count)
    affinity_hits: int = 0  # requests sent to a replica for the prefix it held

    def pick(self, request: Generate | Embed, loads: list[int | None]) -> int:
        """The replica for `request`; `loads` are each replica's outstanding requests, None for
        a replica that cannot take any. At least one must be able to."""
        keys, length = prefix_keys(request)
        least = min(load for load in loads if load is not None)
        choice = None
        for matched in range(len(keys), 0, -1):
            holders = self._holders.get(keys[matched - 1], set())
            allowed = least + (self.slack if matched >= MOST_OF_IT * length else 0)
            near = [i for i in holders if loads[i] is not None and loads[i] <= allowed]
            if near:
                choice = min(near, key=lambda i: (loads[i], i))
                self.affinity_hits += 1
                break
        if choice is None:
            candidates = [i for i, load in enumerate(loads) if load == least]
            choice = candidates[next(self._turn) % len(candidates)]
        self._remember(keys, choice)
        return choice

    def forget(self, replica: int) -> None:
        """A replica lost its cache (its worker died): it holds no prefix any more."""
        for holders in self._holders.values():
            holders.discard(replica)

    def _remember(self, keys: list[bytes], replica: int) -> None:
        for key in keys:
            self._holders.setdefault(key, set()).add(replica)
            self._holders.move_to_end(key)
        while len(self._holders) > MAX_PREFIXES:
            self._holders.popitem(last=False)
