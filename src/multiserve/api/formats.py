"""OpenAI response shapes: chat vs text completions, streamed chunks vs one body.

The generation loop is the same for both endpoints; these classes are the only place the two
wire formats differ.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from multiserve.engine.protocol import TokenLogprob


@dataclass
class ChoiceResult:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt, taken from the prefix cache

    def as_dict(self) -> dict:
        """OpenAI's usage object, with the cached share of the prompt as OpenAI reports it."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class WireFormat:
    """What both endpoints share: ids, timestamps and the model name."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, model: str, want_logprobs: bool) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.want_logprobs = want_logprobs

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def opening_chunks(self, n: int) -> list[dict]:
        return []

    def chunk(
        self, index: int, text: str, logprobs: tuple[TokenLogprob, ...], finish_reason: str | None
    ) -> dict:
        raise NotImplementedError

    def usage_chunk(self, usage: Usage) -> dict:
        body = self._envelope(self.chunk_object_name, [])
        body["usage"] = usage.as_dict()
        return body

    def _choice(self, index: int, result: ChoiceResult) -> dict:
        raise NotImplementedError

    def body(self, results: list[ChoiceResult], usage: Usage) -> dict:
        """The whole (non-streamed) response."""
        body = self._envelope(self.object_name, [self._choice(i, r) for i, r in enumerate(results)])
        body["usage"] = usage.as_dict()
        return body


class ChatFormat(WireFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def _logprobs(self, items: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict | None:
        if not self.want_logprobs:
            return None
        return {
            "content": [
                {
                    "token": item.token,
                    "logprob": item.logprob,
                    "bytes": list(item.bytes),
                    "top_logprobs": [
                        {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}
                        for t in item.top
                    ],
                }
                for item in items
            ],
            "refusal": None,
        }

    def opening_chunks(self, n: int) -> list[dict]:
        return [
            self._envelope(
                self.chunk_object_name,
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            )
            for i in range(n)
        ]

    def chunk(self, index, text, logprobs, finish_reason) -> dict:
        delta = {"content": text} if text else {}
        return self._envelope(
            self.chunk_object_name,
            [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": self._logprobs(logprobs) if logprobs else None,
                    "finish_reason": finish_reason,
                }
            ],
        )

    def _choice(self, index: int, result: ChoiceResult) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": "".join(result.text), "refusal": None},
            "logprobs": self._logprobs(result.logprobs),
            "finish_reason": result.finish_reason,
        }


class TextFormat(WireFormat):
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def _logprobs(
        self, items: tuple[TokenLogprob, ...] | list[TokenLogprob], offset: int = 0
    ) -> dict | None:
        if not self.want_logprobs:
            return None
        offsets, position = [], offset
        for item in items:
            offsets.append(position)
            position += len(item.token)
        return {
            "tokens": [item.token for item in items],
            "token_logprobs": [item.logprob for item in items],
            "top_logprobs": [{t.token: t.logprob for t in item.top} for item in items],
            "text_offset": offsets,
        }

    def chunk(self, index, text, logprobs, finish_reason) -> dict:
        return self._envelope(
            self.chunk_object_name,
            [
                {
                    "index": index,
                    "text": text,
                    "logprobs": self._logprobs(logprobs) if logprobs else None,
                    "finish_reason": finish_reason,
                }
            ],
        )

    def _choice(self, index: int, result: ChoiceResult) -> dict:
        return {
            "index": index,
            "text": "".join(result.text),
            "logprobs": self._logprobs(result.logprobs),
            "finish_reason": result.finish_reason,
        }
