"""Raw llama.cpp, no server: the anchors the benchmarks hold the server against.

The context is the very one the server's worker creates for the same model table
(`multiserve.engine.runtime.context_params` of `multiserve.fleet.manager.worker_config`), not a
copy of its settings, so anchor and server differ only by what the server adds. An anchor runs
in a fresh spawned process that exits before the server is measured, so the two never compete
for the cores and the anchor's memory and threads are gone by then.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from multiserve.config import ModelSpec
from multiserve.engine.protocol import WorkerConfig
from multiserve.fleet.manager import worker_config

if TYPE_CHECKING:  # imports llama.cpp: only the anchor's process loads it
    from multiserve.engine.runtime import Batch

T = TypeVar("T")
Row = tuple[int, int, int, bool]  # token, position, sequence, wants logits

_log_callback: Any = None  # the ctypes callback must outlive every llama.cpp call


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a spawned process that has exited when this returns (`fn` must be a
    module's top-level function, so it pickles)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def import_llama() -> ModuleType:
    """llama_cpp and the engine's runtime (which imports it), silenced; timed apart by the cold
    anchor, as the server's spare worker has paid for them before a request comes."""
    global _log_callback
    import llama_cpp as ll

    import multiserve.engine.runtime  # noqa: F401  (context_params, below)

    @ll.llama_log_callback
    def _drop(_level: int, _text: bytes, _user_data: ctypes.c_void_p) -> None:
        return None

    _log_callback = _drop
    ll.llama_log_set(_drop, None)
    return ll


def _require(handle: Any, what: str) -> Any:
    if not handle:
        raise RuntimeError(f"llama.cpp could not {what}")
    return handle


@dataclass
class RawLlama:
    """A loaded model, the server's context for it, and the engine's batch of one decode step."""

    ll: ModuleType
    ctx: Any
    batch: Batch
    config: WorkerConfig
    vocab: Any
    n_vocab: int

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8
        buf = (self.ll.llama_token * capacity)()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, capacity, True, False)
        if n < 0:
            raise RuntimeError(f"tokenize needs {-n} tokens, had room for {capacity}")
        return list(buf[:n])

    def decode(self, rows: Sequence[Row]) -> None:
        """One llama_decode of `rows`, at most the server's step (`step_tokens`)."""
        self.batch.clear()
        for row in rows:
            self.batch.add(*row)
        rc = self.ll.llama_decode(self.ctx, self.batch.c_batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def argmax(self, row: int) -> int:
        """The greedy next token of the decoded batch's `row`."""
        logits = self.ll.llama_get_logits_ith(self.ctx, row)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def first_token(self, prompt: str) -> tuple[int, int]:
        """Read `prompt` in one step and pick its next token greedily: (prompt tokens, token)."""
        ids = self.tokenize(prompt)
        last = len(ids) - 1
        self.decode([(token, pos, 0, pos == last) for pos, token in enumerate(ids)])
        return len(ids), self.argmax(last)

    def clear(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)


@contextlib.contextmanager
def raw_llama(
    spec: ModelSpec, threads: int, marks: dict[str, float] | None = None
) -> Iterator[RawLlama]:
    """Load `spec.path` on the CPU and create the context the server's worker would for `spec`
    and `threads`; everything is freed on exit. `marks` gets perf_counter times: "start",
    "model" (loaded) and "context" (created)."""
    ll = import_llama()
    from multiserve.engine.runtime import Batch, context_params, model_params

    marks = {} if marks is None else marks
    with contextlib.ExitStack() as cleanup:
        marks["start"] = time.perf_counter()
        ll.llama_backend_init()
        cleanup.callback(ll.llama_backend_free)
        config = worker_config(spec, threads)
        path = str(spec.path)
        loading = model_params(config)  # as a worker loads it
        model = _require(ll.llama_model_load_from_file(path.encode(), loading), f"load {path}")
        cleanup.callback(ll.llama_model_free, model)
        marks["model"] = time.perf_counter()
        ctx = _require(ll.llama_init_from_model(model, context_params(config)), "create a context")
        cleanup.callback(ll.llama_free, ctx)
        marks["context"] = time.perf_counter()
        batch = Batch(config.step_tokens)  # owns its C arrays until the last decode is done
        cleanup.callback(batch.free)
        vocab = ll.llama_model_get_vocab(model)
        yield RawLlama(ll, ctx, batch, config, vocab, ll.llama_vocab_n_tokens(vocab))
