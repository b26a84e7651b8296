"""The only module that talks to llama.cpp: model, context, batch, tokens, logits, KV memory.

Runs inside a worker process. Every ctypes buffer handed to llama.cpp is owned by an object that
outlives the call that reads it (a temporary array freed before `llama_decode` segfaults).
"""

from __future__ import annotations

import ctypes
import sys

import llama_cpp as ll
import numpy as np
from llama_cpp._ggml import libggml

from multiserve.engine.protocol import ModelInfo, WorkerConfig
from multiserve.tools.layouts import TRIGGERS

_GGML_LOG_LEVEL_ERROR = 4  # ggml.h; not exported by llama_cpp
_KV_TYPES = {"f16": ll.GGML_TYPE_F16, "q8_0": ll.GGML_TYPE_Q8_0, "q4_0": ll.GGML_TYPE_Q4_0}


# The tensor an embeddings context's vectors are read from (with pooling off: every token's, and
# inputs are pooled here)
_EMBEDDINGS_NODE = b"result_embd_pooled"
_ggml_get_name = libggml.ggml_get_name
_ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml_get_name.restype = ctypes.c_char_p


@ll.ggml_backend_sched_eval_callback
def _stop_after_embeddings(tensor: ctypes.c_void_p, ask: bool, _user_data: ctypes.c_void_p) -> bool:
    """Ask to see the embeddings node; seeing it, cancel the rest of the graph.

    A generative model's graph goes on from its hidden states to the vocabulary projection of
    every token, which an embeddings request never reads: for Gemma 3 (262k tokens) it costs
    more than the whole model beneath it."""
    return ask and _ggml_get_name(tensor) == _EMBEDDINGS_NODE


# llama.cpp's pooling types, as GGUF metadata spells them, by the names the config uses
_POOLINGS = {
    str(ll.LLAMA_POOLING_TYPE_MEAN): "mean",
    str(ll.LLAMA_POOLING_TYPE_CLS): "cls",
    str(ll.LLAMA_POOLING_TYPE_LAST): "last",
}


class LoadError(RuntimeError):
    """The model file could not be loaded; the message is safe to show (no paths)."""


@ll.llama_log_callback
def _log_errors_only(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    if level == _GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


class Batch:
    """A reusable llama_batch of fixed capacity; owns its C memory until `free`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._batch = ll.llama_batch_init(capacity, 0, 1)
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index in the batch (where its logits will be)."""
        i = self.n_tokens
        if i >= self.capacity:
            raise IndexError("batch is full")
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        self.n_tokens = i + 1
        return i

    @property
    def c_batch(self) -> ll.llama_batch:
        self._batch.n_tokens = self.n_tokens
        return self._batch

    def free(self) -> None:
        ll.llama_batch_free(self._batch)


def context_params(config: WorkerConfig) -> ll.llama_context_params:
    """The llama.cpp context of a worker; the benchmarks' raw llama.cpp anchors use it too, so
    they run exactly what the server runs."""
    params = ll.llama_context_default_params()
    params.n_ctx = config.n_ctx_per_seq * config.n_seq_max
    params.n_batch = config.step_tokens
    params.n_ubatch = config.step_tokens
    params.n_seq_max = config.n_seq_max
    params.n_threads = config.threads
    params.n_threads_batch = config.threads
    params.kv_unified = True
    params.no_perf = True
    params.type_k = _KV_TYPES[config.kv_cache_type]
    params.type_v = _KV_TYPES[config.kv_cache_type]
    # A sliding-window model keeps only the window's cells unless the cache is full size; a
    # cached prefix can then be reused only up to where its window is still intact.
    params.swa_full = config.swa_full
    # llama.cpp stores a quantized V cache only with flash attention, so those imply it
    use_flash = config.flash_attn or config.kv_cache_type != "f16"
    params.flash_attn_type = (
        ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if use_flash else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    if config.embedding:
        # one step's inputs, whole, in one ubatch; the cache is cleared after every step
        params.n_ctx = config.step_tokens
        params.embeddings = True
        params.pooling_type = ll.LLAMA_POOLING_TYPE_NONE  # every token's vector: pooled here
    return params


def _int32_ptr(array: np.ndarray) -> ctypes.Array:
    return array.ctypes.data_as(ctypes.POINTER(ll.llama_token))


def model_params(config: WorkerConfig) -> ll.llama_model_params:
    """How a worker loads its file: on the CPU, read in rather than mapped unless configured.
    llama.cpp repacks most weights into a copy of its own, and the mapped pages it read them
    from would stay resident too (a 7B Q4_K_M model's RSS 1.75x its weights)."""
    params = ll.llama_model_default_params()
    params.n_gpu_layers = 0
    params.load_mode = ll.LLAMA_LOAD_MODE_MMAP if config.mmap else ll.LLAMA_LOAD_MODE_NONE
    return params


class Runtime:
    """One loaded model and one context with `n_seq_max` sequences sharing a unified KV cache."""

    def __init__(self, config: WorkerConfig) -> None:
        ll.llama_log_set(_log_errors_only, None)
        ll.llama_backend_init()
        self.config = config
        model = ll.llama_model_load_from_file(str(config.path).encode(), model_params(config))
        if not model:
            raise LoadError("llama.cpp could not load the model file (corrupt or unsupported)")
        self.model = model
        self.vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)

        params = context_params(config)
        architecture = self.meta("general.architecture")
        if config.embedding and self.meta(f"{architecture}.pooling_type") is None:
            # a model made for embeddings names its pooling, and its graph may go on past the
            # per-token vectors (dense layers); one that names none is a generative model
            params.cb_eval = _stop_after_embeddings
        ctx = ll.llama_init_from_model(model, params)
        if not ctx:
            ll.llama_model_free(model)
            raise LoadError("llama.cpp could not create a context (out of memory or bad shape)")
        self.ctx = ctx
        self.memory = ll.llama_get_memory(ctx)
        n_swa = ll.llama_model_n_swa(model)
        # window the cache keeps per sequence; 0 when every cell of a sequence stays
        self.swa_window = 0 if config.swa_full else n_swa
        self._piece_buf = ctypes.create_string_buffer(256)
        self._piece_cache: dict[int, bytes] = {}
        self.n_embd = ll.llama_model_n_embd_out(model)
        # the tool-call triggers that are one token in this vocabulary: looked up once
        self.special_tokens = {
            text: token for text in TRIGGERS if (token := self._single_token(text)) is not None
        }

    # -- facts -------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # long values such as chat templates
            buf = ctypes.create_string_buffer(n + 1)
            ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def info(self) -> ModelInfo:
        template = ll.llama_model_chat_template(self.model, None)
        return ModelInfo(
            architecture=self.meta("general.architecture") or "unknown",
            name=self.meta("general.name") or self.config.model_id,
            chat_template=template.decode("utf-8", errors="replace") if template else None,
            bos_token=self.token_text(ll.llama_vocab_bos(self.vocab)),
            eos_token=self.token_text(ll.llama_vocab_eos(self.vocab)),
            single_tokens=frozenset(self.special_tokens),
        )

    def own_pooling(self) -> str | None:
        """The pooling the GGUF names (`{arch}.pooling_type`), if one this server does."""
        value = self.meta(f"{self.meta('general.architecture')}.pooling_type")
        if value is None or value == str(ll.LLAMA_POOLING_TYPE_NONE):
            return None
        pooling = _POOLINGS.get(value)
        if pooling is None:
            raise LoadError(f"this model's pooling type ({value}, e.g. a reranker's) is not served")
        return pooling

    def _single_token(self, text: str) -> int | None:
        """The id of the special token spelled `text`, if this vocabulary has one."""
        tokens = self.tokenize(text, add_bos=False, parse_special=True)
        return int(tokens[0]) if len(tokens) == 1 else None

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._to_piece(token, special=True).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    # -- tokens ------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool, parse_special: bool) -> np.ndarray:
        """Token ids (int32). No Python object per token: a huge prompt is tokenized on the
        worker's reader thread, and per-token Python work would hold the GIL the decode loop
        needs."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = np.empty(capacity, np.int32)
        n = ll.llama_tokenize(
            self.vocab, data, len(data), _int32_ptr(tokens), capacity, add_bos, parse_special
        )
        if n < 0:  # buffer too small: -n is the size needed
            tokens = np.empty(-n, np.int32)
            n = ll.llama_tokenize(
                self.vocab, data, len(data), _int32_ptr(tokens), -n, add_bos, parse_special
            )
        return tokens[:n]

    def piece(self, token: int) -> bytes:
        """Bytes a generated token stands for (control tokens render as nothing)."""
        cached = self._piece_cache.get(token)
        if cached is None:
            cached = self._piece_cache[token] = self._to_piece(token, special=False)
        return cached

    def _to_piece(self, token: int, special: bool) -> bytes:
        buf = self._piece_buf
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    # -- compute -----------------------------------------------------------------------------

    def decode(self, batch: Batch) -> int:
        """Run one forward pass; 0 on success (llama.cpp's return code otherwise)."""
        return ll.llama_decode(self.ctx, batch.c_batch)

    def logits(self, batch_index: int) -> np.ndarray:
        """A copy of the logits at one output position of the last decode."""
        return self.logits_view(batch_index).copy()

    def logits_view(self, batch_index: int) -> np.ndarray:
        """The logits in llama.cpp's buffer, valid only until the next decode."""
        ptr = ll.llama_get_logits_ith(self.ctx, batch_index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def embeddings(self, n_tokens: int) -> np.ndarray:
        """Every token's vector of the last decode (an embeddings context), in batch order; valid
        only until the next decode."""
        ptr = ll.llama_get_embeddings(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_tokens, self.n_embd))

    def clear(self) -> None:
        """Forget every sequence's cells (an embeddings context keeps none between steps)."""
        ll.llama_memory_clear(self.memory, False)

    def forget(self, seq: int) -> None:
        """Free a sequence's KV cells at once so the slot and its memory can be reused."""
        ll.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def truncate(self, seq: int, length: int) -> None:
        """Keep only the first `length` positions of a sequence."""
        ll.llama_memory_seq_rm(self.memory, seq, length, -1)

    def share(self, src: int, dst: int, length: int) -> None:
        """Give `dst` the first `length` positions of `src`: the unified cache shares the cells,
        so nothing is computed or copied."""
        ll.llama_memory_seq_cp(self.memory, src, dst, 0, length)

    def can_continue(self, seq: int, length: int) -> bool:
        """Whether a sequence truncated to `length` still holds every cell the next position
        attends to. Always true without a sliding window; with one, the window's oldest cells
        may already have been given to other sequences."""
        if self.swa_window == 0 or length == 0:
            return True
        pos_min = ll.llama_memory_seq_pos_min(self.memory, seq)
        return 0 <= pos_min <= max(0, length - self.swa_window - 1)

    def save_state(self, seq: int) -> bytearray:
        """The sequence's KV cells as bytes (for the host prompt cache)."""
        size = ll.llama_state_seq_get_size(self.ctx, seq)
        state = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(state)
        written = ll.llama_state_seq_get_data(self.ctx, view, size, seq)
        del view  # release the export so the bytearray may be resized or freed
        return state[:written] if written != size else state

    def load_state(self, seq: int, state: bytearray) -> bool:
        """Put saved cells back into `seq` (replacing what it held); False if llama.cpp refused."""
        ll.llama_memory_seq_rm(self.memory, seq, -1, -1)
        view = (ctypes.c_uint8 * len(state)).from_buffer(state)
        loaded = ll.llama_state_seq_set_data(self.ctx, view, len(state), seq)
        del view
        return loaded > 0

    def close(self) -> None:
        ll.llama_free(self.ctx)
        ll.llama_model_free(self.model)
