"""Continuous batching: every step is one llama_decode over all running choices plus prompt chunks.

A step holds the next token of every running choice and, under the step's token budget, chunks of
prompts still being read, so a long new prompt never freezes the streams already running. Requests
join between steps, and a finished or cancelled choice frees its slot at once.

Prompts are read as little as possible. A slot keeps its cells after its request ends, and a new
request starts from the longest prefix it shares with what is cached: in an idle slot (the slot
is taken over and truncated), in a busy one (the unified KV cache shares the cells with a
sequence copy), in a prompt another request is still reading (the request waits for that reading
and then shares it, so one system prompt sent by eight users at once is read once), or in the host
prompt cache (the saved cells are loaded). Only the rest of the prompt is computed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from multiserve.engine.detokenizer import IncrementalDetokenizer
from multiserve.engine.prefix_cache import HostCache, HostEntry, Slot, SlotTable, common_prefix
from multiserve.engine.protocol import (
    Accepted,
    CacheUsage,
    ChoiceDelta,
    Event,
    FinishReason,
    Generate,
    Prefilled,
    Rejected,
    TextPrompt,
    TokenLogprob,
    start_deadline,
)
from multiserve.engine.runtime import Batch, Runtime
from multiserve.engine.sampling import (
    ChoiceSampler,
    SamplingError,
    grammar_spec,
    make_sampler,
    sample_step,
    token_logprob,
)

# A copy, a load from host memory or a wait for another request's reading is taken only when it
# saves at least this many prompt tokens over the best idle slot.
MIN_REUSE_GAIN = 16
# Prompts shorter than this are cheaper to read again than to save in host memory.
HOST_MIN_TOKENS = 256


@dataclass
class Choice:
    """One output sequence of a request, living in one KV slot."""

    request_id: str
    index: int
    sampler: ChoiceSampler
    detokenizer: IncrementalDetokenizer
    max_tokens: int
    logprobs: int | None
    ignore_eos: bool
    keep_cache: bool = True
    slot: int = -1
    n_past: int = 0
    next_token: int = -1
    generated: int = 0


@dataclass
class Job:
    """A request: one prompt, read once into the first choice's slot, then shared with the rest."""

    request_id: str
    prompt: np.ndarray
    choices: list[Choice]
    deadline: float | None = None
    cache_prompt: bool = True
    prefilled: int = 0
    cached: int = 0  # prompt tokens taken from a cache instead of computed
    source: Job | None = None  # a job still reading the prompt prefix this one will share
    shared: int = 0  # how much of `source`'s prompt this one waits for

    @property
    def leader(self) -> Choice:
        return self.choices[0]


@dataclass(frozen=True)
class _Source:
    """Cells of a prompt prefix outside the idle slots: in a busy slot (shared at once), in a
    prompt another job is still reading (shared once read), or saved in the host cache."""

    origin: Slot | Job | HostEntry
    length: int


class Scheduler:
    """Owns the slots, the waiting queue and the step loop of one worker."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        config = runtime.config
        self.n_ctx = config.n_ctx_per_seq
        self.batch = Batch(config.step_tokens)
        self.slots = SlotTable(config.n_seq_max, config.n_ctx_per_seq)
        self.reuse = config.prefix_cache
        self.host_cache = (
            HostCache(config.host_cache_bytes)
            if config.prefix_cache and config.host_cache_bytes > 0
            else None
        )
        self.waiting: deque[Job] = deque()
        self.prefilling: list[Job] = []
        self.running: list[Choice] = []

    # -- requests ---------------------------------------------------------------------------

    def prepare(self, request: Generate) -> Job | Rejected:
        """Tokenize and check a request, or say why not (bad input never raises).

        Reads only the vocabulary and the model's limits, so it may run on another thread
        while steps run: the worker prepares requests as they arrive, off the decode loop.
        """
        try:
            return self._make_job(request)
        except SamplingError as exc:
            return Rejected(request.request_id, str(exc), exc.param, code="unsupported_schema")
        except _Refusal as exc:
            return Rejected(request.request_id, exc.message, exc.param, code=exc.code)

    def enqueue(self, job: Job) -> None:
        """Queue a prepared request; `Accepted` follows from a later step, when it gets slots."""
        self.waiting.append(job)

    def submit(self, request: Generate) -> Rejected | None:
        """Prepare and queue a request at once (on the decode thread)."""
        prepared = self.prepare(request)
        if isinstance(prepared, Rejected):
            return prepared
        self.enqueue(prepared)
        return None

    def cancel(self, request_id: str) -> None:
        for job in list(self.waiting):
            if job.request_id == request_id:
                self.waiting.remove(job)
                self._drop(job.choices)
        for job in list(self.prefilling):
            if job.request_id == request_id:
                self.prefilling.remove(job)
                self._drop(job.choices)
                for follower in self.prefilling:  # they read the prompt themselves after all
                    if follower.source is job:
                        follower.source = None
        for choice in [c for c in self.running if c.request_id == request_id]:
            self._release(choice)

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting)

    def counts(self) -> tuple[int, int]:
        """(running requests, waiting requests) for metrics."""
        active = {c.request_id for c in self.running} | {j.request_id for j in self.prefilling}
        return len(active), len(self.waiting)

    def idle_slots(self) -> int:
        return len(self.slots.idle())

    def host_cache_usage(self) -> CacheUsage:
        host = self.host_cache
        return CacheUsage(host.bytes, len(host)) if host is not None else CacheUsage()

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Admit, build one batch, decode it, sample every choice that got logits."""
        events = self._admit()
        batch = self.batch
        batch.clear()
        decoding = [
            (choice, batch.add(choice.next_token, choice.n_past, choice.slot, True))
            for choice in self.running
        ]
        budget = batch.capacity - batch.n_tokens
        chunks: list[tuple[Job, int, int]] = []
        prompts_done: list[tuple[Job, int]] = []
        for job in self.prefilling:
            if budget <= 0:
                break
            if job.source is not None:
                continue  # waits to share a prompt another job is reading
            start = job.prefilled
            end = min(len(job.prompt), start + budget)
            slot = job.leader.slot
            for pos in range(start, end):
                index = batch.add(int(job.prompt[pos]), pos, slot, pos == len(job.prompt) - 1)
            chunks.append((job, start, end))
            job.prefilled, budget = end, budget - (end - start)
            if end == len(job.prompt):
                prompts_done.append((job, index))
        if batch.n_tokens == 0:
            return events

        if self.runtime.decode(batch) != 0:
            return events + self._fail_batch(decoding)

        slots = self.slots.slots
        for job, start, end in chunks:
            slots[job.leader.slot].append(job.prompt[start:end])
        for choice, _ in decoding:
            choice.n_past += 1
            slots[choice.slot].append([choice.next_token])
        self._share_with_followers()  # before a finished source frees the cells

        sampled: list[tuple[Choice, int]] = []
        for job, index in prompts_done:
            self.prefilling.remove(job)
            leader = slots[job.leader.slot]
            for choice in job.choices[1:]:  # fork all before sampling: the leader may finish
                self.runtime.forget(choice.slot)
                self.runtime.share(job.leader.slot, choice.slot, len(job.prompt))
                slots[choice.slot].set(leader.held)
            events.append(Prefilled(job.request_id, job.cached))
            for choice in job.choices:
                choice.n_past = len(job.prompt)
                self.running.append(choice)
                sampled.append((choice, index))
        sampled += decoding
        tokens = sample_step(self.runtime, [(c.sampler, index) for c, index in sampled])
        for (choice, index), token in zip(sampled, tokens, strict=True):
            events.append(self._advance(choice, index, token))
        return events

    def _advance(self, choice: Choice, index: int, token: int) -> ChoiceDelta:
        """Take a sampled token: its text, log-probabilities and whether the choice is done."""
        logprobs: tuple[TokenLogprob, ...] = ()
        if choice.logprobs is not None:
            logits = self.runtime.logits_view(index)
            logprobs = (token_logprob(self.runtime, logits, token, choice.logprobs),)
        choice.generated += 1
        choice.next_token = token
        finish: FinishReason | None = None
        if self.runtime.is_eog(token) and not choice.ignore_eos:
            text, finish = choice.detokenizer.flush(), "stop"
        else:
            text, hit_stop = choice.detokenizer.push(self._piece(choice, token))
            if hit_stop:
                finish = "stop"
            elif choice.generated >= choice.max_tokens or choice.n_past + 1 >= self.n_ctx:
                text, finish = text + choice.detokenizer.flush(), "length"
        if finish is not None:
            self._release(choice)
        return ChoiceDelta(choice.request_id, choice.index, text, 1, finish, logprobs)

    def _piece(self, choice: Choice, token: int) -> bytes:
        """The token's text; control tokens are empty, but for the one that starts tool calls."""
        if token == choice.sampler.shown_token:
            return self.runtime.token_text(token).encode()
        return self.runtime.piece(token)

    # -- slots -------------------------------------------------------------------------------

    def _admit(self) -> list[Event]:
        """First come, first served: the head of the queue waits until all its slots are free.

        Requests whose queue deadline passed leave the queue without running.
        """
        events: list[Event] = []
        now = time.monotonic()
        for job in [j for j in self.waiting if j.deadline is not None and j.deadline < now]:
            self.waiting.remove(job)
            self._drop(job.choices)
            events.append(
                Rejected(job.request_id, "timed out waiting in the queue", timed_out=True)
            )
        while self.waiting and self.idle_slots() >= len(self.waiting[0].choices):
            job = self.waiting.popleft()
            self._place(job)
            self.prefilling.append(job)
            events.append(Accepted(job.request_id, len(job.prompt)))
        return events

    def _place(self, job: Job) -> None:
        """Give the job its slots, starting its leader from the best cached prefix there is."""
        prompt = job.prompt
        usable = len(prompt) - 1  # the last prompt token is always computed: its logits answer
        reuse = self.reuse and job.cache_prompt
        slot, cached = self.slots.best_idle(prompt) if reuse else (None, 0)
        cached = min(cached, usable)
        if cached < MIN_REUSE_GAIN:  # too little to reuse: spare the slots holding caches
            slot, cached = self.slots.cheapest_idle(set()), 0
        best, source = cached, None
        if reuse:
            for candidate in self._better_sources(job, usable):
                if candidate.length >= best + MIN_REUSE_GAIN:
                    best, source = candidate.length, candidate
        if source is None:
            self._evict(slot, keep=cached)
            cached = self._truncate(slot, cached)
        else:  # the cells come from elsewhere: take the idle slot worth least
            slot = self.slots.cheapest_idle(set())
            self._evict(slot, keep=0)
            cached = self._take(job, slot, source)
        job.prefilled = job.cached = cached
        slot.busy = True
        job.leader.slot = slot.seq
        taken = {slot.seq}
        for choice in job.choices[1:]:
            other = self.slots.cheapest_idle(taken)
            self._evict(other, keep=0)
            other.busy = True
            choice.slot = other.seq
            taken.add(other.seq)

    def _better_sources(self, job: Job, usable: int) -> list[_Source]:
        """Cached prefixes of the job's prompt outside the idle slots."""
        prompt = job.prompt
        found: list[_Source] = []
        owners = {c.slot: c.keep_cache for c in self.running}
        owners |= {j.leader.slot: j.cache_prompt for j in self.prefilling}
        for slot in self.slots.slots:
            if slot.busy and owners.get(slot.seq, False):
                found.append(_Source(slot, min(common_prefix(slot.held, prompt), usable)))
        for other in self.prefilling:
            if other.cache_prompt and other.source is None:
                length = min(common_prefix(other.prompt, prompt), usable)
                if length > other.prefilled:
                    found.append(_Source(other, length))
        if self.host_cache is not None:
            entry, length = self.host_cache.best(prompt)
            if entry is not None:
                found.append(_Source(entry, min(length, usable)))
        return found

    def _take(self, job: Job, slot: Slot, source: _Source) -> int:
        """Fill an emptied slot from a source; returns how many prompt tokens it now holds."""
        runtime, origin, length = self.runtime, source.origin, source.length
        if isinstance(origin, Slot):
            runtime.share(origin.seq, slot.seq, length)
        elif isinstance(origin, HostEntry):
            assert self.host_cache is not None
            if not runtime.load_state(slot.seq, origin.state):
                runtime.forget(slot.seq)
                return 0
            self.host_cache.touch(origin)
            runtime.truncate(slot.seq, length)
        else:  # a job still reading: the cells are shared once it has read them
            job.source, job.shared = origin, length
            return 0
        slot.set(job.prompt[:length])
        return self._checked(slot, length)

    def _truncate(self, slot: Slot, length: int) -> int:
        if length < slot.length:
            self.runtime.truncate(slot.seq, length)
            slot.length = length
        return self._checked(slot, length)

    def _checked(self, slot: Slot, length: int) -> int:
        """A sliding-window cache may no longer hold the window before `length`: start over."""
        if self.runtime.can_continue(slot.seq, length):
            return length
        self.runtime.forget(slot.seq)
        slot.length = 0
        return 0

    def _evict(self, slot: Slot, keep: int) -> None:
        """About to keep only `keep` of an idle slot's tokens: save a long prompt to host memory
        first if most of it would be lost, then empty the slot if nothing is kept."""
        host = self.host_cache
        if (
            host is not None
            and slot.length >= HOST_MIN_TOKENS
            and keep < slot.length // 2
            and not host.covers(slot.held)
        ):
            host.put(slot.held, self.runtime.save_state(slot.seq))
        if keep == 0 and slot.length:
            self.runtime.forget(slot.seq)
            slot.length = 0

    def _share_with_followers(self) -> None:
        """Jobs waiting on a prompt another job reads take its cells once it has read far enough
        (right after that step, while a sliding window still holds them)."""
        for job in self.prefilling:
            source = job.source
            if source is not None and source.prefilled >= job.shared:
                slot = self.slots.slots[job.leader.slot]
                self.runtime.share(source.leader.slot, slot.seq, job.shared)
                slot.set(job.prompt[: job.shared])
                job.prefilled = job.cached = self._checked(slot, job.shared)
                job.source = None

    def _release(self, choice: Choice) -> None:
        if choice in self.running:
            self.running.remove(choice)
        self._drop([choice])

    def _drop(self, choices: list[Choice], keep: bool = True) -> None:
        """Free the choices' slots; their cells stay cached unless `keep` is false or the
        request opted out of caching."""
        now = time.monotonic()
        for choice in choices:
            choice.sampler.free()
            if choice.slot >= 0:
                slot = self.slots.slots[choice.slot]
                if not (keep and choice.keep_cache):
                    self.runtime.forget(slot.seq)
                    slot.length = 0
                slot.busy, slot.last_used = False, now
                choice.slot = -1

    def _fail_batch(self, decoding: list[tuple[Choice, int]]) -> list[Event]:
        """llama_decode failed: end every choice that was in the batch with an error, and forget
        what their slots held (the decode may have half-written them)."""
        events: list[Event] = []
        for choice, _ in decoding:
            self.running.remove(choice)
            self._drop([choice], keep=False)
            events.append(ChoiceDelta(choice.request_id, choice.index, "", 0, "error"))
        for job in self.prefilling:
            self._drop(job.choices, keep=False)
            events += [ChoiceDelta(job.request_id, c.index, "", 0, "error") for c in job.choices]
        self.prefilling.clear()
        return events

    # -- request checks ----------------------------------------------------------------------

    def _make_job(self, request: Generate) -> Job:
        params = request.params
        runtime = self.runtime
        if isinstance(request.prompt, TextPrompt):
            segments = request.prompt.segments
            parts = [
                runtime.tokenize(segment.text, request.add_bos and i == 0, segment.special)
                for i, segment in enumerate(segments)
            ]
            prompt = np.concatenate(parts) if parts else np.empty(0, np.int32)
        else:
            prompt = np.asarray(request.prompt.ids, np.int64)
            outside = (prompt < 0) | (prompt >= runtime.n_vocab)
            if outside.any():
                bad = int(prompt[outside.argmax()])
                raise _Refusal(
                    f"token id {bad} is outside the vocabulary (0..{runtime.n_vocab - 1})",
                    "prompt",
                    "token_out_of_vocabulary",
                )
        if len(prompt) == 0:
            raise _Refusal("the prompt is empty after tokenization", "prompt", "empty_prompt")
        bad_bias = next((t for t, _ in params.logit_bias if t >= runtime.n_vocab), None)
        if bad_bias is not None:
            raise _Refusal(
                f"logit_bias token id {bad_bias} is outside the vocabulary",
                "logit_bias",
                "token_out_of_vocabulary",
            )
        if request.n > runtime.config.n_seq_max:
            raise _Refusal(
                f"n={request.n} exceeds this model's {runtime.config.n_seq_max} parallel sequences",
                "n",
                "n_too_large",
            )
        room = self.n_ctx - len(prompt)
        wanted = params.max_tokens if params.max_tokens is not None else room
        if room < 1 or wanted > room:
            raise _Refusal(
                f"This model's maximum context length is {self.n_ctx} tokens. However, you "
                f"requested {len(prompt) + wanted} tokens ({len(prompt)} in the prompt, "
                f"{wanted} for the completion). Please reduce the prompt or max_tokens.",
                "max_tokens" if room >= 1 else "messages",
                "context_length_exceeded",
            )
        grammar = grammar_spec(runtime, params)
        choices: list[Choice] = []
        try:
            for index in range(request.n):
                choices.append(
                    Choice(
                        request.request_id,
                        index,
                        make_sampler(runtime, params, grammar, index),
                        IncrementalDetokenizer(params.stop),
                        wanted,
                        params.logprobs,
                        params.ignore_eos,
                        request.cache_prompt,
                    )
                )
        except SamplingError:
            self._drop(choices)
            raise
        tokens = np.asarray(prompt, np.int32)
        return Job(
            request.request_id,
            tokens,
            choices,
            start_deadline(request.queue_timeout),
            request.cache_prompt,
        )


class _Refusal(Exception):
    def __init__(self, message: str, param: str | None, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
