"""What to send: synthetic prompts of a chosen length, or prompts read from a JSONL file.

Synthetic prompts are random common words, one word standing for about one token, so the input
length is set without a tokenizer for the server's model (the server's `usage.prompt_tokens`
gives the real count afterwards). Every prompt is derived from (--seed, request index) alone,
so two runs with the same seed send byte-identical requests, and no two requests of a run share
a long prefix that a server-side prefix cache could reuse.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Endpoint = Literal["chat", "completions"]

_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "that", "for", "on", "are", "with", "as", "his",
    "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "word", "but", "what",
    "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your",
    "how", "said", "an", "each", "she", "which", "do", "their", "time", "if", "will", "way",
    "about", "many", "then", "them", "write", "would", "like", "so", "these", "her", "long",
    "make", "thing", "see", "him", "two", "has", "look", "more", "day", "could", "go", "come",
    "did", "number", "sound", "no", "most", "people", "my", "over", "know", "water", "than",
    "call", "first", "who", "may", "down", "side", "been", "now", "find", "any", "new", "work",
    "part", "take", "get", "place", "made", "live", "where", "after", "back", "little", "only",
    "round", "man", "year", "came", "show", "every", "good", "me", "give", "our", "under", "name",
    "very", "through", "just", "form", "sentence", "great", "think", "say", "help", "low", "line",
    "differ", "turn", "cause", "much", "mean", "before", "move", "right", "boy", "old", "too",
    "same", "tell", "does", "set", "three", "want", "air", "well", "also", "play", "small", "end",
    "put", "home", "read", "hand", "port", "large", "spell", "add", "even", "land", "here", "must",
    "big", "high", "such", "follow", "act", "why", "ask", "men", "change", "went", "light", "kind",
    "off", "need", "house", "picture", "try", "us", "again", "animal", "point", "mother", "world",
    "near", "build", "self", "earth", "father", "head",
)  # fmt: skip


class WorkloadError(ValueError):
    """The prompts file or the workload options cannot make requests."""


@dataclass(frozen=True)
class Prompt:
    """One request's input: a completion prompt or chat messages, and its token budget."""

    prompt: str | None
    messages: list[dict[str, Any]] | None
    max_tokens: int
    approx_input_tokens: int  # words; replaced by the server's usage.prompt_tokens when given


@dataclass(frozen=True)
class Workload:
    """The prompts of a run; request i uses prompt i (files cycle when the run is longer)."""

    endpoint: Endpoint
    input_tokens: int
    output_tokens: int
    seed: int
    file_prompts: tuple[Prompt, ...] | None = None

    def prompt(self, index: int) -> Prompt:
        if self.file_prompts is not None:
            return self.file_prompts[index % len(self.file_prompts)]
        return self._synthetic(index)

    def _synthetic(self, index: int) -> Prompt:
        rng = random.Random(f"{self.seed}:{index}")  # str seeds hash deterministically
        text = " ".join(rng.choice(_WORDS) for _ in range(self.input_tokens))
        if self.endpoint == "chat":
            return Prompt(
                None, [{"role": "user", "content": text}], self.output_tokens, self.input_tokens
            )
        return Prompt(text, None, self.output_tokens, self.input_tokens)


def _approx_tokens(text: str) -> int:
    return len(text.split())


def _line_prompt(data: Any, lineno: int, endpoint: Endpoint, output_tokens: int) -> Prompt:
    where = f"line {lineno}"
    if not isinstance(data, dict):
        raise WorkloadError(f"{where}: expected a JSON object")
    max_tokens = data.get("max_tokens", output_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise WorkloadError(f"{where}: max_tokens must be a positive integer")
    if "messages" in data:
        messages = data["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m for m in messages
        ):
            raise WorkloadError(f"{where}: messages must be a list of {{role, content}} objects")
        if endpoint == "completions":
            raise WorkloadError(f"{where}: `messages` needs --endpoint chat")
        words = sum(_approx_tokens(str(m.get("content") or "")) for m in messages)
        return Prompt(None, messages, max_tokens, words)
    if "prompt" in data:
        text = data["prompt"]
        if not isinstance(text, str):
            raise WorkloadError(f"{where}: prompt must be a string")
        if endpoint == "chat":
            return Prompt(
                None, [{"role": "user", "content": text}], max_tokens, _approx_tokens(text)
            )
        return Prompt(text, None, max_tokens, _approx_tokens(text))
    raise WorkloadError(f'{where}: needs "prompt" or "messages"')


def read_prompts(path: Path, endpoint: Endpoint, output_tokens: int) -> tuple[Prompt, ...]:
    """Prompts from JSONL: one `{"prompt": ...}` or `{"messages": [...]}` object a line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WorkloadError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    prompts = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"line {lineno}: invalid JSON ({exc.msg})") from None
        prompts.append(_line_prompt(data, lineno, endpoint, output_tokens))
    if not prompts:
        raise WorkloadError(f"prompts file {path} has no prompts")
    return tuple(prompts)


def make_workload(
    endpoint: Endpoint,
    input_tokens: int,
    output_tokens: int,
    seed: int,
    prompts_file: Path | None = None,
) -> Workload:
    if input_tokens < 1 or output_tokens < 1:
        raise WorkloadError("--input-tokens and --output-tokens must be at least 1")
    file_prompts = read_prompts(prompts_file, endpoint, output_tokens) if prompts_file else None
    return Workload(endpoint, input_tokens, output_tokens, seed, file_prompts)
