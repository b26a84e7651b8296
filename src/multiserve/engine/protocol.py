"""Messages between the API process and a model worker (pickled over a multiprocessing pipe).

A worker starts blank (so one can be started ahead of need) and gets `Load`; it answers once with
`WorkerReady` or `LoadFailed`. Then the API process sends `Generate`, `Cancel` and `Shutdown`, and
the worker sends one `StepOutput` per batched decode step carrying every request's events. An
embedding model's worker takes `Embed` instead of `Generate` and answers each with `Embedded`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np

from multiserve.tools.layouts import ToolLayout

FinishReason = Literal["stop", "length", "error"]


def start_deadline(timeout: float | None) -> float | None:
    """The time on this machine's monotonic clock by which a request that may wait `timeout`
    seconds from now must have started (None: no limit)."""
    return None if timeout is None else time.monotonic() + timeout


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to load its model; built from a ModelSpec by the API process."""

    model_id: str
    path: Path
    n_ctx_per_seq: int
    n_seq_max: int
    step_tokens: int
    threads: int
    kv_cache_type: str = "f16"
    flash_attn: bool = True
    mmap: bool = False  # map the file rather than read it (see ModelSpec.mmap)
    swa_full: bool = True  # sliding-window models keep every cell, so any prefix can be reused
    prefix_cache: bool = True  # reuse cached prompt prefixes across requests
    host_cache_bytes: int = 0  # bound of the prompt cache in host memory (0: none)
    embedding: bool = False  # an embeddings context: takes `Embed`, answers `Embedded`
    pooling: str | None = None  # "mean", "cls" or "last"; None: the GGUF's own, else mean
    normalize: bool = True  # vectors scaled to unit length


@dataclass(frozen=True)
class ToolConstraint:
    """The tool calls a choice is held to: the family's layout and each tool's parameters."""

    layout: ToolLayout
    tools: tuple[tuple[str, str], ...]  # (function name, JSON text of its parameters schema)
    required: bool  # a call must come, from the first token ("required" or a named function)
    parallel: bool  # several calls allowed in one answer


@dataclass(frozen=True)
class SamplingParams:
    """Per-choice sampling: how each choice picks its tokens, and what it is held to."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    json_schema: str | None = None  # JSON text of a schema; "" means any JSON object
    tools: ToolConstraint | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: sampled token plus k alternatives

    @property
    def penalised(self) -> bool:
        """Whether the repeat, frequency or presence penalty changes anything."""
        return (self.repeat_penalty, self.frequency_penalty, self.presence_penalty) != (1, 0, 0)


@dataclass(frozen=True)
class PromptSegment:
    """Part of a rendered chat prompt; `special` if control tokens in it are to be recognised.

    Template text is special; message text is not, so typed control tokens stay plain text.
    """

    text: str
    special: bool


@dataclass(frozen=True)
class TextPrompt:
    """A prompt to tokenize, segment by segment."""

    segments: tuple[PromptSegment, ...]

    @classmethod
    def completion(cls, text: str) -> TextPrompt:
        """A /v1/completions prompt: control tokens spelled in it count, as llama.cpp reads it."""
        return cls((PromptSegment(text, special=True),))


@dataclass(frozen=True)
class TokenPrompt:
    """A prompt given as token ids."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class Load:
    """First message to a (possibly pre-started) worker: which model to load.

    With `listen` (host, authkey), the worker, once loaded, listens on that host for the one
    client with the key and serves it instead of its parent: a worker on a Ray node talks to the
    API process directly, with no relay between them."""

    config: WorkerConfig
    listen: tuple[str, bytes] | None = None


@dataclass(frozen=True)
class Generate:
    request_id: str
    prompt: TextPrompt | TokenPrompt
    n: int
    params: SamplingParams
    add_bos: bool = True  # False when a chat template already wrote the BOS token
    # seconds it may wait to start, from its arrival at the worker (monotonic clocks are not
    # shared between machines, so a deadline cannot travel)
    queue_timeout: float | None = None
    cache_prompt: bool = True  # False: neither reuse cached cells nor leave any behind


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class ModelInfo:
    """What the API process needs to render chat prompts, without loading llama.cpp itself."""

    architecture: str
    name: str
    chat_template: str | None
    bos_token: str
    eos_token: str
    single_tokens: frozenset[str] = frozenset()  # tool-call triggers that are one token here


@dataclass(frozen=True)
class WorkerReady:
    info: ModelInfo
    pid: int
    address: tuple[str, int] | None = None  # where it listens, when loaded with `listen`


@dataclass(frozen=True)
class LoadFailed:
    message: str


@dataclass(frozen=True)
class TopLogprob:
    token: str
    bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Accepted:
    """The request got its sequence slots and starts running in the next step."""

    request_id: str
    prompt_tokens: int


@dataclass(frozen=True)
class Prefilled:
    """The prompt is read; `cached_tokens` of it came from a cache instead of being computed."""

    request_id: str
    cached_tokens: int


@dataclass(frozen=True)
class Rejected:
    """The worker refused the request before running it: a client error unless `timed_out`."""

    request_id: str
    message: str
    param: str | None = None
    code: str | None = None  # machine-readable reason, e.g. "context_length_exceeded"
    timed_out: bool = False  # waited in the queue past its deadline


@dataclass(frozen=True)
class ChoiceDelta:
    """New text of one choice from one step; `finish_reason` set on its last delta."""

    request_id: str
    index: int
    text: str
    new_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Embed:
    """Inputs to embed, each a text (tokenized by the worker) or token ids; `Embedded` or
    `Rejected` answers it."""

    request_id: str
    inputs: tuple[str | tuple[int, ...], ...]
    # keep this many leading components (renormalised if the model normalises)
    dimensions: int | None = None
    queue_timeout: float | None = None  # seconds it may wait to start (as Generate's)


@dataclass(frozen=True)
class Embedded:
    """Every input's vector, in order: float32 rows; None when llama_decode failed."""

    request_id: str
    vectors: np.ndarray | None
    prompt_tokens: int


Event = Accepted | Prefilled | Rejected | ChoiceDelta | Embedded


@dataclass(frozen=True)
class CacheUsage:
    """The worker's host prompt cache, for /stats."""

    bytes: int = 0
    entries: int = 0


@dataclass(frozen=True)
class StepOutput:
    events: list[Event] = field(default_factory=list)
    running: int = 0
    waiting: int = 0
    host_cache: CacheUsage = CacheUsage()
