"""Memory a model will take once loaded, estimated from its GGUF header before loading it.

weights (tensor sizes) + KV cache (layers x cells x KV heads x head dims x cache type) + compute
buffers (logits and attention scores of one step) + the worker process itself. Good enough to
decide what fits a budget; /stats shows the measured RSS beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from multiserve.config import ModelSpec
from multiserve.fleet.gguf_header import ArrayInfo, GGUFHeader

KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
KV_CELL_ROUNDING = 256  # llama.cpp rounds the KV cache size up to this many cells
WORKER_OVERHEAD = 160 * 2**20  # Python, llama.cpp and thread stacks of an idle worker


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
    overhead: int = WORKER_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "compute": self.compute,
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

    cells = -(-spec.n_ctx * spec.n_parallel // KV_CELL_ROUNDING) * KV_CELL_ROUNDING
    per_element = KV_BYTES_PER_ELEMENT[spec.kv_cache_type]
    kv_cache = int(n_layer * cells * n_head_kv * (key_len + value_len) * per_element)
    step = spec.step_tokens
    logits = 4 * n_vocab * step
    attention_scores = 4 * n_head * step * cells
    activations = 4 * step * n_embd * 16
    return MemoryEstimate(header.weights_bytes, kv_cache, logits + attention_scores + activations)
