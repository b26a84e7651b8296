"""Continuous batching: every step is one llama_decode over all running choices plus prompt chunks.

A step holds the next token of every running choice and, under the step's token budget, chunks of
prompts still being read, so a long new prompt never freezes the streams already running. Requests
join between steps, and a finished or cancelled choice frees its KV cells and slot at once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from multiserve.engine.detokenizer import IncrementalDetokenizer
from multiserve.engine.protocol import (
    Accepted,
    ChoiceDelta,
    Event,
    FinishReason,
    Generate,
    PromptSegment,
    Rejected,
    TokenLogprob,
)
from multiserve.engine.runtime import Batch, Runtime
from multiserve.engine.sampling import (
    Sampler,
    SamplingError,
    choice_seed,
    grammar_for,
    token_logprob,
)


@dataclass
class Choice:
    """One output sequence of a request, living in one KV slot."""

    request_id: str
    index: int
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    max_tokens: int
    logprobs: int | None
    ignore_eos: bool
    slot: int = -1
    n_past: int = 0
    next_token: int = -1
    generated: int = 0


@dataclass
class Job:
    """A request: one prompt, read once into the first choice's slot, then shared with the rest."""

    request_id: str
    prompt: list[int]
    choices: list[Choice]
    deadline: float | None = None
    prefilled: int = 0

    @property
    def leader(self) -> Choice:
        return self.choices[0]


class Scheduler:
    """Owns the slots, the waiting queue and the step loop of one worker."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        config = runtime.config
        self.n_ctx = config.n_ctx_per_seq
        self.batch = Batch(config.step_tokens)
        self.free_slots: deque[int] = deque(range(config.n_seq_max))
        self.waiting: deque[Job] = deque()
        self.prefilling: list[Job] = []
        self.running: list[Choice] = []

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request: Generate) -> Rejected | None:
        """Tokenize, check and queue a request; a Rejected says why not (bad input never raises).

        `Accepted` follows from a later step, when the request gets its slots.
        """
        try:
            job = self._make_job(request)
        except SamplingError as exc:
            return Rejected(request.request_id, str(exc), exc.param, code="unsupported_schema")
        except _Refusal as exc:
            return Rejected(request.request_id, exc.message, exc.param, code=exc.code)
        self.waiting.append(job)
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
        for choice in [c for c in self.running if c.request_id == request_id]:
            self._release(choice)

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting)

    def counts(self) -> tuple[int, int]:
        """(running requests, waiting requests) for metrics."""
        active = {c.request_id for c in self.running} | {j.request_id for j in self.prefilling}
        return len(active), len(self.waiting)

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Admit, build one batch, decode it, sample every choice that got logits."""
        events = self._admit()
        if not self.running and not self.prefilling:
            return events
        batch = self.batch
        batch.clear()
        decoding = [
            (choice, batch.add(choice.next_token, choice.n_past, choice.slot, True))
            for choice in self.running
        ]
        budget = batch.capacity - batch.n_tokens
        prompts_done: list[tuple[Job, int]] = []
        for job in self.prefilling:
            if budget <= 0:
                break
            take = min(budget, len(job.prompt) - job.prefilled)
            end = job.prefilled + take
            slot = job.leader.slot
            for pos in range(job.prefilled, end):
                index = batch.add(job.prompt[pos], pos, slot, pos == len(job.prompt) - 1)
            job.prefilled, budget = end, budget - take
            if end == len(job.prompt):
                prompts_done.append((job, index))

        if self.runtime.decode(batch) != 0:
            return events + self._fail_batch(decoding)

        for job, index in prompts_done:
            self.prefilling.remove(job)
            for choice in job.choices[1:]:  # fork all before sampling: the leader may finish
                self.runtime.fork(job.leader.slot, choice.slot)
            for choice in job.choices:
                choice.n_past = len(job.prompt)
                self.running.append(choice)
                events.append(self._sample(choice, index))
        for choice, index in decoding:
            choice.n_past += 1
            events.append(self._sample(choice, index))
        return events

    def _sample(self, choice: Choice, index: int) -> ChoiceDelta:
        logprobs: tuple[TokenLogprob, ...] = ()
        logits = self.runtime.logits(index) if choice.logprobs is not None else None
        token = choice.sampler.sample(self.runtime, index)
        if logits is not None:
            logprobs = (token_logprob(self.runtime, logits, token, choice.logprobs or 0),)
        choice.generated += 1
        choice.next_token = token
        finish: FinishReason | None = None
        if self.runtime.is_eog(token) and not choice.ignore_eos:
            text, finish = choice.detokenizer.flush(), "stop"
        else:
            text, hit_stop = choice.detokenizer.push(self.runtime.piece(token))
            if hit_stop:
                finish = "stop"
            elif choice.generated >= choice.max_tokens or choice.n_past + 1 >= self.n_ctx:
                text, finish = text + choice.detokenizer.flush(), "length"
        if finish is not None:
            self._release(choice)
        return ChoiceDelta(choice.request_id, choice.index, text, 1, finish, logprobs)

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
        while self.waiting and len(self.free_slots) >= len(self.waiting[0].choices):
            job = self.waiting.popleft()
            for choice in job.choices:
                choice.slot = self.free_slots.popleft()
            self.prefilling.append(job)
            events.append(Accepted(job.request_id, len(job.prompt)))
        return events

    def _release(self, choice: Choice) -> None:
        if choice in self.running:
            self.running.remove(choice)
        self._drop([choice])

    def _drop(self, choices: list[Choice]) -> None:
        for choice in choices:
            choice.sampler.free()
            if choice.slot >= 0:
                self.runtime.forget(choice.slot)
                self.free_slots.append(choice.slot)
                choice.slot = -1

    def _fail_batch(self, decoding: list[tuple[Choice, int]]) -> list[Event]:
        """llama_decode failed: end every choice that was in the batch with an error."""
        events: list[Event] = []
        for choice, _ in decoding:
            self._release(choice)
            events.append(ChoiceDelta(choice.request_id, choice.index, "", 0, "error"))
        for job in self.prefilling:
            self._drop(job.choices)
            events += [ChoiceDelta(job.request_id, c.index, "", 0, "error") for c in job.choices]
        self.prefilling.clear()
        return events

    # -- request checks ----------------------------------------------------------------------

    def _make_job(self, request: Generate) -> Job:
        params = request.params
        runtime = self.runtime
        if isinstance(request.prompt, str):
            prompt = runtime.tokenize(request.prompt, request.add_bos, request.parse_special)
        elif request.prompt and isinstance(request.prompt[0], PromptSegment):
            prompt = []
            for i, segment in enumerate(request.prompt):
                add_bos = request.add_bos and i == 0
                prompt += runtime.tokenize(segment.text, add_bos, segment.special)
        else:
            prompt = list(request.prompt)
            bad = next((t for t in prompt if not 0 <= t < runtime.n_vocab), None)
            if bad is not None:
                raise _Refusal(
                    f"token id {bad} is outside the vocabulary (0..{runtime.n_vocab - 1})",
                    "prompt",
                    "token_out_of_vocabulary",
                )
        if not prompt:
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
        grammar = grammar_for(params.json_schema) if params.json_schema is not None else None
        choices: list[Choice] = []
        try:
            for index in range(request.n):
                sampler = Sampler(runtime, params, grammar, choice_seed(params, index))
                choices.append(
                    Choice(
                        request.request_id,
                        index,
                        sampler,
                        IncrementalDetokenizer(params.stop),
                        wanted,
                        params.logprobs,
                        params.ignore_eos,
                    )
                )
        except SamplingError:
            self._drop(choices)
            raise
        return Job(request.request_id, prompt, choices, request.queue_deadline)


class _Refusal(Exception):
    def __init__(self, message: str, param: str | None, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
