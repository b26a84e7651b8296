"""Embeddings in batches: every step is one llama_decode of as many whole inputs as fit.

Inputs of every waiting request share a step, each under a sequence id of its own, until the
step's tokens (`step_tokens`) or sequences (`n_parallel`) run out; a request's inputs run in
order, and a request whose inputs do not fit leaves room for the next one's. Each input is read
whole in one step, so its vector is pooled from the per-token vectors of that one decode; the
cache is cleared after every step, as no input outlives its step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from multiserve.engine.protocol import (
    CacheUsage,
    Embed,
    Embedded,
    Event,
    Rejected,
    start_deadline,
)
from multiserve.engine.runtime import Batch, Runtime


@dataclass
class EmbedJob:
    """A request: its inputs as token ids, and the vectors of those embedded so far."""

    request_id: str
    inputs: list[np.ndarray]
    vectors: np.ndarray  # (inputs, n_embd) float32
    dimensions: int | None
    deadline: float | None
    done: int = 0  # inputs embedded, in order

    @property
    def started(self) -> bool:
        return self.done > 0


def pool(rows: np.ndarray, lengths: np.ndarray, how: str) -> np.ndarray:
    """One vector per input from consecutive runs of token vectors (`lengths` rows each)."""
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    if how == "mean":
        return np.add.reduceat(rows, starts, axis=0) / lengths[:, None].astype(np.float32)
    return rows[starts if how == "cls" else starts + lengths - 1]


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length; a zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1).astype(np.float32)


class Embedder:
    """The step loop of an embedding model's worker (the Scheduler's counterpart)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.pooling = self.config.pooling or runtime.own_pooling() or "mean"
        self.batch = Batch(self.config.step_tokens)
        self.jobs: deque[EmbedJob] = deque()

    # -- requests ---------------------------------------------------------------------------

    def prepare(self, request: Embed) -> EmbedJob | Rejected:
        """Tokenize and check every input, or say which one cannot be embedded and why.

        Reads only the vocabulary, so it may run on the worker's reader thread during steps."""
        runtime, limit = self.runtime, self.config.n_ctx_per_seq
        inputs: list[np.ndarray] = []
        for index, given in enumerate(request.inputs):
            if isinstance(given, str):
                tokens = runtime.tokenize(given, add_bos=True, parse_special=True)
            else:
                tokens = np.asarray(given, np.int64)
                outside = (tokens < 0) | (tokens >= runtime.n_vocab)
                if outside.any():
                    return Rejected(
                        request.request_id,
                        f"input[{index}] has token id {int(tokens[outside.argmax()])}, outside "
                        f"the vocabulary (0..{runtime.n_vocab - 1})",
                        "input",
                        "token_out_of_vocabulary",
                    )
            if len(tokens) == 0 or len(tokens) > limit:
                return Rejected(
                    request.request_id,
                    f"input[{index}] has {len(tokens)} tokens; this model takes 1 to {limit} "
                    "tokens per input",
                    "input",
                    "context_length_exceeded" if len(tokens) else "empty_prompt",
                )
            inputs.append(tokens.astype(np.int32))
        if request.dimensions is not None and request.dimensions > runtime.n_embd:
            return Rejected(
                request.request_id,
                f"dimensions must be at most {runtime.n_embd}, this model's embedding size",
                "dimensions",
                "dimensions_too_large",
            )
        vectors = np.empty((len(inputs), runtime.n_embd), np.float32)
        return EmbedJob(
            request.request_id,
            inputs,
            vectors,
            request.dimensions,
            start_deadline(request.queue_timeout),
        )

    def enqueue(self, job: EmbedJob) -> None:
        self.jobs.append(job)

    def cancel(self, request_id: str) -> None:
        self.jobs = deque(job for job in self.jobs if job.request_id != request_id)

    def has_work(self) -> bool:
        return bool(self.jobs)

    def counts(self) -> tuple[int, int]:
        """(requests under way, requests not started)."""
        started = sum(job.started for job in self.jobs)
        return started, len(self.jobs) - started

    def host_cache_usage(self) -> CacheUsage:
        return CacheUsage()  # no prompt cache: nothing of an input outlives its step

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Embed as many whole inputs as fit one decode; answer the requests that are done."""
        events = self._drop_expired()
        taken = self._fill()
        if not taken:
            return events
        runtime = self.runtime
        if runtime.decode(self.batch) != 0:
            runtime.clear()
            failed = {job.request_id: job for job, _ in taken}
            self.jobs = deque(job for job in self.jobs if job.request_id not in failed)
            return events + [Embedded(request_id, None, 0) for request_id in failed]
        lengths = np.array([len(job.inputs[i]) for job, i in taken])
        vectors = pool(runtime.embeddings(self.batch.n_tokens), lengths, self.pooling)
        runtime.clear()
        for (job, index), vector in zip(taken, vectors, strict=True):
            job.vectors[index] = vector
            job.done = index + 1
        finished = [job for job in self.jobs if job.done == len(job.inputs)]
        for job in finished:
            self.jobs.remove(job)
            events.append(self._answer(job))
        return events

    def _drop_expired(self) -> list[Event]:
        """Requests not started by their queue deadline leave without running."""
        now = time.monotonic()
        expired = [
            job
            for job in self.jobs
            if not job.started and job.deadline is not None and job.deadline < now
        ]
        for job in expired:
            self.jobs.remove(job)
        return [
            Rejected(job.request_id, "timed out waiting in the queue", timed_out=True)
            for job in expired
        ]

    def _fill(self) -> list[tuple[EmbedJob, int]]:
        """Put whole inputs into the batch, each its own sequence: (job, input index) of each."""
        batch = self.batch
        batch.clear()
        taken: list[tuple[EmbedJob, int]] = []
        for job in self.jobs:
            for index in range(job.done, len(job.inputs)):
                tokens = job.inputs[index]
                full = len(taken) == self.config.n_seq_max
                if full or batch.n_tokens + len(tokens) > batch.capacity:
                    break
                seq = len(taken)
                for pos, token in enumerate(tokens.tolist()):
                    batch.add(token, pos, seq, True)
                taken.append((job, index))
            if len(taken) == self.config.n_seq_max:
                break
        return taken

    def _answer(self, job: EmbedJob) -> Embedded:
        vectors = job.vectors[:, : job.dimensions] if job.dimensions else job.vectors
        if self.config.normalize:
            vectors = normalized(vectors)
        tokens = sum(len(tokens) for tokens in job.inputs)
        return Embedded(job.request_id, np.ascontiguousarray(vectors), tokens)
