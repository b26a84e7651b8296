"""One API request's worker streams, read as one: a list `prompt` runs one stream per prompt.

Choices are numbered prompt by prompt, as OpenAI does: prompt i's choice j is `i * n + j`. The
streams run side by side in the worker; the response starts once every one was accepted, so a
refusal of any prompt is still a proper status.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from multiserve.backends.client import RequestStream, RunningModel
from multiserve.engine.protocol import Accepted, ChoiceDelta, Event, Generate, Rejected


class RequestGroup:
    """The streams of one API request; `close` cancels whatever is still running."""

    def __init__(self, engine: RunningModel, requests: list[Generate]) -> None:
        self.streams: list[RequestStream] = []
        try:
            for request in requests:
                self.streams.append(engine.open(request))
        except BaseException:
            self.close()
            raise
        self.n = sum(request.n for request in requests)

    @property
    def done(self) -> bool:
        return all(stream.done for stream in self.streams)

    @property
    def cached_tokens(self) -> int:
        return sum(stream.cached_tokens for stream in self.streams)

    async def accepted(self) -> Accepted | Rejected:
        """Accepted (prompt tokens summed over the prompts) or the first prompt's refusal."""
        prompt_tokens = 0
        for stream in self.streams:
            first = await stream.next()
            if isinstance(first, Rejected):
                return first
            assert isinstance(first, Accepted)
            prompt_tokens += first.prompt_tokens
        return Accepted(self.streams[0].request.request_id, prompt_tokens)

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every choice's deltas, as they come, numbered across the prompts."""
        if len(self.streams) == 1:  # the common case: no task per event
            stream = self.streams[0]
            while not stream.done:
                if isinstance(event := await stream.next(), ChoiceDelta):
                    yield event
            return
        offsets, offset = {}, 0
        for stream in self.streams:
            offsets[stream], offset = offset, offset + stream.request.n
        pending: dict[asyncio.Task[Event], RequestStream] = {}
        try:
            for stream in self.streams:
                pending[asyncio.ensure_future(stream.next())] = stream
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    stream = pending.pop(task)
                    event = task.result()  # a worker gone raises here
                    if not stream.done:
                        pending[asyncio.ensure_future(stream.next())] = stream
                    if isinstance(event, ChoiceDelta):
                        yield dataclasses.replace(event, index=event.index + offsets[stream])
        finally:
            for task in pending:
                task.cancel()

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
