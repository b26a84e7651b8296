"""OpenAI response shapes: chat vs text completions, streamed chunks vs one body.

The generation loop is the same for both endpoints; these classes are the only place the two
wire formats differ.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from multiserve.engine.protocol import TokenLogprob
from multiserve.tools.layouts import ToolLayout
from multiserve.tools.parsing import CallDelta, ToolCall, ToolCallReader


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

    def chunks(
        self, index: int, text: str, logprobs: tuple[TokenLogprob, ...], finish_reason: str | None
    ) -> list[dict]:
        """The stream chunks for one choice's new text (and its end, if `finish_reason`)."""
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

    def __init__(self, model: str, want_logprobs: bool, tools: ToolLayout | None = None) -> None:
        super().__init__(model, want_logprobs)
        self.tools = tools  # the layout to read tool calls in, if the model may call tools
        self._readers: dict[int, ToolCallReader] = {}

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
        # with tools the answer may be calls alone, whose content OpenAI gives as null
        content = None if self.tools is not None else ""
        return [
            self._envelope(
                self.chunk_object_name,
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": content},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            )
            for i in range(n)
        ]

    def _chunk(self, index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
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

    def chunks(self, index, text, logprobs, finish_reason) -> list[dict]:
        if self.tools is None:
            delta = {"content": text} if text else {}
            return [self._chunk(index, delta, logprobs, finish_reason)]
        reader = self._readers.setdefault(index, ToolCallReader(self.tools))
        parsed = reader.feed(text)
        if finish_reason is not None:
            tail = reader.finish()
            parsed.content += tail.content
            parsed.calls += tail.calls
        out = []
        if parsed.content or logprobs:
            delta = {"content": parsed.content} if parsed.content else {}
            out.append(self._chunk(index, delta, logprobs))
        out += [self._chunk(index, {"tool_calls": [_call_delta(c)]}) for c in parsed.calls]
        if finish_reason is not None:
            out.append(self._chunk(index, {}, None, _finish(finish_reason, reader.calls)))
        return out

    def _choice(self, index: int, result: ChoiceResult) -> dict:
        text = "".join(result.text)
        message: dict = {"role": "assistant", "content": text, "refusal": None}
        finish_reason = result.finish_reason
        if self.tools is not None:
            reader = ToolCallReader(self.tools)
            content = reader.feed(text).content + reader.finish().content
            message["content"] = content
            if reader.calls:
                message["content"] = content if content.strip() else None
                message["tool_calls"] = [_call(call) for call in reader.calls]
                finish_reason = _finish(finish_reason, reader.calls)
        return {
            "index": index,
            "message": message,
            "logprobs": self._logprobs(result.logprobs),
            "finish_reason": finish_reason,
        }


def _finish(reason: str | None, calls: list[ToolCall]) -> str | None:
    """OpenAI's reason for an answer that ended after calling tools."""
    return "tool_calls" if calls and reason == "stop" else reason


def _call(call: ToolCall) -> dict:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _call_delta(delta: CallDelta) -> dict:
    """A streamed piece of a call: first its id and name, then fragments of its arguments."""
    if delta.id is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    return {
        "index": delta.index,
        "id": delta.id,
        "type": "function",
        "function": {"name": delta.name, "arguments": delta.arguments},
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

    def chunks(self, index, text, logprobs, finish_reason) -> list[dict]:
        choice = {
            "index": index,
            "text": text,
            "logprobs": self._logprobs(logprobs) if logprobs else None,
            "finish_reason": finish_reason,
        }
        return [self._envelope(self.chunk_object_name, [choice])]

    def _choice(self, index: int, result: ChoiceResult) -> dict:
        return {
            "index": index,
            "text": "".join(result.text),
            "logprobs": self._logprobs(result.logprobs),
            "finish_reason": result.finish_reason,
        }
