"""Which replica of a model takes a request: fewest outstanding requests, with prefix affinity.

A replica keeps the prompts it has read in its KV cache, so the next turn of a conversation (the
same prompt plus an answer and a new message) reads only its new part if it returns to the same
replica, and all of it anywhere else. So the router remembers, for the prompts it has routed,
which replica got each prefix (hashes of the prompt at fixed block boundaries, newest in a
bounded LRU), and sends a request to the replica holding its longest known prefix, unless that
replica has `slack` more requests outstanding than the least loaded one: then load wins. A
request with no known prefix goes to the least loaded replica (ties in turn). This is the shape
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


def prefix_keys(request: Generate | Embed) -> list[bytes]:
    """Digests of the request's prompt at each block boundary, shortest prefix first."""
    if not isinstance(request, Generate):
        return []  # an embedding keeps nothing in a cache
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
    return keys


@dataclass
class ReplicaRouter:
    """Picks a replica per request (see the module's docstring); counts what it did."""

    slack: int
    _owners: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    _turn: itertools.count = field(default_factory=itertools.count)
    affinity_hits: int = 0  # requests sent to the replica that held their prefix

    def pick(self, request: Generate | Embed, loads: list[int | None]) -> int:
        """The replica for `request`; `loads` are each replica's outstanding requests, None for
        a replica that cannot take any. At least one must be able to."""
        keys = prefix_keys(request)
        open_loads = [load for load in loads if load is not None]
        least = min(open_loads)
        choice = None
        for key in reversed(keys):
            owner = self._owners.get(key)
            if (
                owner is not None
                and loads[owner] is not None
                and loads[owner] <= least + self.slack
            ):
                choice = owner
                self.affinity_hits += 1
                break
        if choice is None:
            candidates = [i for i, load in enumerate(loads) if load == least]
            choice = candidates[next(self._turn) % len(candidates)]
        self._remember(keys, choice)
        return choice

    def _remember(self, keys: list[bytes], replica: int) -> None:
        for key in keys:
            self._owners[key] = replica
            self._owners.move_to_end(key)
        while len(self._owners) > MAX_PREFIXES:
            self._owners.popitem(last=False)
