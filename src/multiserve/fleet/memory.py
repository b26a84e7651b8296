"""Memory a model will take once loaded, estimated from its GGUF header before loading it.

weights (tensor sizes) + KV cache (layers x cells x KV heads x head dims x cache type) + compute
buffers (attention scores, mask and logits of one step) + the host prompt cache's bound + the
worker process itself. Sliding-window layers count at full size, which is what they take with
`swa_full` (the default); with it off the estimate is high by their share. These are
the sizes llama.cpp allocates (checked against its own buffer-size log lines: KV exact, compute
within 15% above, tested with flash attention off and on); RSS grows toward them as contexts
fill, and /stats shows it beside them.

An embedding model's context holds one step (its cache is cleared after each), and every token of
a step is an output: llama.cpp's output buffer then holds a step's logits (whether the graph
computes them or not) and vectors, counted with the compute buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

from multiserve.config import ModelSpec
from multiserve.fleet.gguf_header import ArrayInfo, GGUFHeader

KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
KV_CELL_ROUNDING = 256  # llama.cpp rounds the KV cache size up to this many cells
WORKER_OVERHEAD = 64 * 2**20  # Python and llama.cpp in an idle worker (55 MiB RSS measured)


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int
    host_cache: int = 0
    overhead: int = WORKER_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.host_cache + self.overhead

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "compute": self.compute,
            "host_cache": self.host_cache,
            "overhead": self.overhead,
            "total": self.total,
        }


def _largest(value: object, default: int) -> int:
    """Per-layer arrays (e.g. head_count_kv in some models) count at their largest."""
    if isinstance(value, ArrayInfo):
        return max((int(v) for v in value.values or ()), default=default)
    return int(value) if isinstance(value, int | float) else default


def estimate_memory(header: GGUFHeader, spec: ModelSpec) -> MemoryEstimate:
    n_layer = _largest(header.arch_value("block_count"), 1)
    n_embd = _largest(header.arch_value("embedding_length"), 0)
    n_head = max(1, _largest(header.arch_value("attention.head_count"), 1))
    n_head_kv = _largest(header.arch_value("attention.head_count_kv"), n_head)
    key_len = _largest(header.arch_value("attention.key_length"), n_embd // n_head)
    value_len = _largest(header.arch_value("attention.value_length"), key_len)
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    n_vocab = tokens.count if isinstance(tokens, ArrayInfo) else 32_000

    held = spec.step_tokens if spec.embedding else spec.n_ctx * spec.n_parallel
    cells = -(-held // KV_CELL_ROUNDING) * KV_CELL_ROUNDING
    per_element = KV_BYTES_PER_ELEMENT[spec.kv_cache_type]
    kv_cache = int(n_layer * cells * n_head_kv * (key_len + value_len) * per_element)
    n_ff = _largest(header.arch_value("feed_forward_length"), 4 * n_embd)
    step = spec.step_tokens
    # One step's largest f32 tensor (llama.cpp's allocator reuses buffers, so the terms are
    # alternatives, not a sum): the logits, the attention scores of all heads plus the mask
    # (flash attention keeps only an f16 mask), or the feed-forward gate and up projections;
    # plus the residual stream and norms alive beside it.
    attention = 2 * step * cells if spec.flash_attn else 4 * (n_head + 1) * step * cells
    largest = max(4 * n_vocab * step, attention, 4 * 2 * n_ff * step)
    compute = largest + 4 * 6 * n_embd * step
    if spec.embedding:
        compute += 4 * (n_vocab + n_embd) * max(step, spec.n_parallel)
    return MemoryEstimate(header.weights_bytes, kv_cache, compute, spec.host_cache_bytes(kv_cache))
