"""Equal work: a server that produced fewer tokens than asked cannot win a speed comparison.

llama-cpp-python's server ignores `ignore_eos`, so it may stop at the model's end of text and
look faster for doing less. Each side's completion tokens are counted against what its requests
asked for, and a side that fell short is reported as such instead of being counted as a win.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class Work:
    """Completion tokens produced and asked for, over the requests behind one figure."""

    done: int = 0
    asked: int = 0
    requests: int = 0
    short: int = 0  # requests that got fewer tokens than asked

    def add(self, done: int, asked: int) -> None:
        self.done += done
        self.asked += asked
        self.requests += 1
        self.short += done < asked

    @property
    def less(self) -> bool:
        return self.short > 0

    def describe(self, name: str) -> str:
        """'<name> did less work: N of M tokens (k of R requests short)', or '' if it did it all."""
        if not self.less:
            return ""
        return (
            f"{name} did less work: {self.done} of {self.asked} tokens "
            f"({self.short} of {self.requests} requests short)"
        )


def judged(ok: bool, ours: Work | None, theirs: Work | None) -> bool | None:
    """A speed comparison weighed by work: False when we did less work (our speed is no win),
    None when we lost only to a side that did less work (its speed is no win either), else ok."""
    if ours is not None and ours.less:
        return False
    if not ok and theirs is not None and theirs.less:
        return None
    return ok


def work_notes(works: Mapping[str, Work | None]) -> str:
    """The sides that did less work, said in one line ('' when none did)."""
    return "; ".join(w.describe(name) for name, w in works.items() if w is not None and w.less)
