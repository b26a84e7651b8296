"""One streaming request, timed chunk by chunk; every failure becomes a classified record.

Why it is careful: a load tester that raises on the first odd byte loses the run, and one that
retries blindly adds load to a server that just said it is full. So nothing escapes `send()`
except cancellation, a malformed stream is an error (never a success with fewer tokens), and
429/503 refusals are retried only after waiting what the server asked (capped), growing the
wait exponentially with jitter, and each refusal is counted.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from multiserve.bench.workload import Endpoint, Prompt

TokenSource = Literal["usage", "chunks"]
RETRYABLE = frozenset({429, 503})
MESSAGE_LIMIT = 300  # characters of an error message kept in a record


@dataclass(frozen=True)
class ClientOptions:
    """Everything a request carries besides its prompt, and how patiently to retry."""

    url: str
    model: str
    endpoint: Endpoint = "chat"
    api_key: str | None = None
    temperature: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    timeout: float = 120.0  # whole request, retries' waits excluded
    max_retries: int = 3
    backoff_base: float = 0.5  # first wait when the server gives no Retry-After (seconds)
    backoff_cap: float = 30.0  # no single wait is longer, whatever Retry-After says
    max_connections: int = 64


@dataclass(frozen=True)
class RequestError:
    kind: str  # http_4xx, http_5xx (with status), timeout, connect, transport, malformed_stream,
    # stream_error (an `error` event in the stream), cancelled, client_error
    message: str
    status: int | None = None


@dataclass
class RequestRecord:
    """One request as the client saw it; times are perf_counter seconds."""

    index: int
    sent: float = 0.0  # the attempt that produced this record (after any refusals)
    first_sent: float = 0.0
    finished: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # content chunks' arrival
    output_tokens: int = 0
    output_token_source: TokenSource = "chunks"
    input_tokens: int = 0
    input_token_source: Literal["usage", "estimate"] = "estimate"
    finish_reason: str | None = None
    refusals: int = 0  # 429/503 answers received (each one retried or, the last, the error)
    retry_wait: float = 0.0  # seconds spent waiting between refused attempts
    error: RequestError | None = None

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2el(self) -> float:
        return self.finished - self.sent

    @property
    def itl(self) -> list[float]:
        times = self.chunk_times
        return [b - a for a, b in itertools.pairwise(times)]


class StreamFailure(Exception):
    """A stream that is not a complete answer (`kind`, as in RequestError); `send` turns it into
    a record's error."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.error = RequestError(kind, message[:MESSAGE_LIMIT], status)


class Refused(Exception):
    """A 429/503 answer: retry after `wait` seconds (None: no usable Retry-After)."""

    def __init__(self, status: int, message: str, wait: float | None) -> None:
        super().__init__(message)
        self.status, self.message, self.wait = status, message, wait


def api_base(url: str) -> str:
    """`http://host:8000` and `http://host:8000/v1` both mean the server's OpenAI API root."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def server_root(url: str) -> str:
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds (fractions accepted) or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if seconds == seconds else None  # NaN is unusable


def backoff_delay(
    attempt: int, retry_after: float | None, base: float, cap: float, rng: random.Random
) -> float:
    """Never sooner than the server asked; doubling per attempt; capped; plus up to 10% jitter."""
    delay = max(retry_after or 0.0, base * 2**attempt)
    delay = min(delay, cap)
    return delay + rng.uniform(0, 0.1 * delay)


def request_body(prompt: Prompt, options: ClientOptions) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": options.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": prompt.max_tokens,
    }
    if prompt.messages is not None:
        body["messages"] = prompt.messages
    else:
        body["prompt"] = prompt.prompt
    if options.ignore_eos:
        body["ignore_eos"] = True  # a non-standard field: sent only when asked for
    if options.temperature is not None:
        body["temperature"] = options.temperature
    if options.seed is not None:
        body["seed"] = options.seed
    return body


def _error_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip() or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(data.get("message"), str):
            return data["message"]
    return text.strip()


def choice_text(choice: dict[str, Any], endpoint: Endpoint) -> str:
    """Generated text of a chunk's choice; reasoning models stream tokens in reasoning fields."""
    if endpoint == "completions":
        text = choice.get("text")
        return text if isinstance(text, str) else ""
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        return ""
    parts = [delta.get(k) for k in ("content", "reasoning_content", "reasoning")]
    return "".join(p for p in parts if isinstance(p, str))


async def stream_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an OpenAI-style event stream, in order, up to `data: [DONE]`.

    One strict reader for every client of a stream (this load tester and the repository's
    benchmarks): raises StreamFailure on a line that is not SSE, data that is not a JSON object,
    an error event, or a stream that ends before [DONE], so that nothing passes as an answer.
    """
    event = ""
    async for line in response.aiter_lines():
        if not line:
            event = ""  # a blank line ends an SSE event
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        field_name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field_name == "event":
            event = value.strip()
            continue
        if field_name in ("id", "retry"):
            continue
        if field_name != "data":
            raise StreamFailure("malformed_stream", f"not an SSE line: {line[:100]!r}")
        if value.strip() == "[DONE]":
            return
        try:
            data = json.loads(value)
        except ValueError:
            raise StreamFailure(
                "malformed_stream", f"invalid JSON in stream: {value[:100]!r}"
            ) from None
        if not isinstance(data, dict):
            raise StreamFailure("malformed_stream", f"stream data is not an object: {value!r}")
        if event == "error" or "error" in data or data.get("object") == "error":
            err = data.get("error", data)
            message = err.get("message") if isinstance(err, dict) else err
            raise StreamFailure("stream_error", str(message or value))
        yield data
    raise StreamFailure("malformed_stream", "stream ended before data: [DONE]")


class BenchClient:
    """Sends requests to one server only: every URL is `--url`'s, and redirects are not followed."""

    def __init__(
        self,
        options: ClientOptions,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options
        self._path = "/chat/completions" if options.endpoint == "chat" else "/completions"
        headers = {"Accept": "text/event-stream"}
        if options.api_key:
            headers["Authorization"] = f"Bearer {options.api_key}"
        connect = min(options.timeout, 10.0)
        self._http = httpx.AsyncClient(
            base_url=api_base(options.url),
            headers=headers,
            timeout=httpx.Timeout(options.timeout, connect=connect),
            limits=httpx.Limits(
                max_connections=options.max_connections,
                max_keepalive_connections=options.max_connections,
            ),
            trust_env=False,  # no proxies, no netrc: only ever the given URL
            follow_redirects=False,
            transport=transport,
        )
        self._rng = rng or random.Random()
        self.sleep = asyncio.sleep  # tests may replace it to observe waits

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> BenchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(self, index: int, prompt: Prompt) -> RequestRecord:
        """One request, refusals retried; returns a record, raises only CancelledError."""
        record = RequestRecord(index=index, input_tokens=prompt.approx_input_tokens)
        body = request_body(prompt, self.options)
        record.first_sent = time.perf_counter()
        attempt = 0
        while True:
            record.sent = time.perf_counter()
            record.chunk_times.clear()
            try:
                async with asyncio.timeout(self.options.timeout):
                    await self._attempt(body, record)
                record.error = None
            except Refused as refused:
                record.refusals += 1
                kind = f"http_{refused.status // 100}xx"
                record.error = RequestError(kind, refused.message[:MESSAGE_LIMIT], refused.status)
                if attempt < self.options.max_retries:
                    record.finished = time.perf_counter()
                    wait = backoff_delay(
                        attempt,
                        refused.wait,
                        self.options.backoff_base,
                        self.options.backoff_cap,
                        self._rng,
                    )
                    attempt += 1
                    started = time.perf_counter()
                    await self.sleep(wait)
                    record.retry_wait += time.perf_counter() - started
                    continue
            except StreamFailure as failure:
                record.error = failure.error
            except TimeoutError:
                record.error = RequestError(
                    "timeout", f"no complete answer within --timeout {self.options.timeout:g}s"
                )
            except httpx.ConnectError as exc:
                record.error = RequestError("connect", str(exc) or type(exc).__name__)
            except httpx.TimeoutException as exc:
                kind = "connect" if isinstance(exc, httpx.ConnectTimeout) else "timeout"
                record.error = RequestError(kind, str(exc) or type(exc).__name__)
            except httpx.RemoteProtocolError as exc:
                # The peer closed mid-stream (or sent bytes HTTP cannot parse).
                record.error = RequestError("malformed_stream", f"stream cut: {exc}"[:300])
            except httpx.HTTPError as exc:
                record.error = RequestError("transport", f"{type(exc).__name__}: {exc}"[:300])
            except Exception as exc:  # a bug here must cost one record, not the run
                record.error = RequestError("client_error", f"{type(exc).__name__}: {exc}"[:300])
            record.finished = time.perf_counter()
            return record

    async def _attempt(self, body: dict[str, Any], record: RequestRecord) -> None:
        async with self._http.stream("POST", self._path, json=body) as response:
            if response.status_code != 200:
                raw = await self._read_limited(response)
                message = _error_message(raw)
                if response.status_code in RETRYABLE:
                    wait = parse_retry_after(response.headers.get("retry-after"))
                    raise Refused(response.status_code, message, wait)
                status = response.status_code
                raise StreamFailure(f"http_{status // 100}xx", message, status)
            await self._read_stream(response, record)

    @staticmethod
    async def _read_limited(response: httpx.Response, limit: int = 16384) -> bytes:
        data = b""
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) >= limit:
                break
        return data[:limit]

    async def _read_stream(self, response: httpx.Response, record: RequestRecord) -> None:
        endpoint = self.options.endpoint
        usage: dict[str, Any] | None = None
        async for data in stream_events(response):
            choices = data.get("choices") or []
            if choices and isinstance(choices[0], dict):
                choice = choices[0]
                if choice_text(choice, endpoint):
                    record.chunk_times.append(time.perf_counter())
                if choice.get("finish_reason"):
                    record.finish_reason = choice["finish_reason"]
            if isinstance(data.get("usage"), dict):
                usage = data["usage"]
        if record.finish_reason is None:
            # e.g. llama-cpp-python's server cuts a stream when a new request arrives
            # (interrupt_requests) and still sends [DONE]: not a complete answer.
            raise StreamFailure(
                "malformed_stream", "stream ended without a finish_reason (cut short?)"
            )
        self._finish(record, usage)

    @staticmethod
    def _finish(record: RequestRecord, usage: dict[str, Any] | None) -> None:
        completion = usage.get("completion_tokens") if usage else None
        if isinstance(completion, int) and not isinstance(completion, bool):
            record.output_tokens, record.output_token_source = completion, "usage"
        else:
            record.output_tokens, record.output_token_source = len(record.chunk_times), "chunks"
        prompt_tokens = usage.get("prompt_tokens") if usage else None
        if isinstance(prompt_tokens, int) and not isinstance(prompt_tokens, bool):
            record.input_tokens, record.input_token_source = prompt_tokens, "usage"
