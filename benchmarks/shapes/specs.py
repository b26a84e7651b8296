"""The five experts (and a small model for the test suite) as llama.cpp sees their Q4_K_M files.

Each shape holds what decides a file's size and a model's speed: architecture, layer count,
widths, heads, vocabulary, context, and which quantisation type each tensor has. The values are
the models' published configs and real GGUF files, as docs/shape_true_models.md lists with its
sources; `tensor_plan` applies llama.cpp's Q4_K_M type rules (src/llama-quant.cpp,
`llama_tensor_get_type`) to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gguf import GGMLQuantizationType as Q

F32, Q4_K, Q5_K, Q6_K = Q.F32, Q.Q4_K, Q.Q5_K, Q.Q6_K


@dataclass(frozen=True)
class ModelShape:
    """One model's architecture as its GGUF file states it."""

    name: str
    arch: str  # llama.cpp's architecture name
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rope_base: float
    norm_eps: float
    tied_embeddings: bool = False  # no output.weight: the token embedding projects the logits
    qkv_bias: bool = False  # Qwen 2: biases on the q, k and v projections
    rope_freqs: bool = False  # Llama 3's rope scaling factors tensor
    metadata: tuple[tuple[str, object], ...] = ()  # arch-specific keys, without the arch prefix
    published_bytes: int = 0  # the real Q4_K_M file's size (0: none to compare with)
    published_as: str = ""  # where that size comes from, and how precise it is
    fused_qkv_type: Q = Q5_K  # phi3's attn_qkv: Q5_K in every layer, as in the real file
    notes: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dims: tuple[int, ...]  # GGUF order: ne0 (a row's length) first
    qtype: Q

    @property
    def values(self) -> int:
        count = 1
        for dim in self.dims:
            count *= dim
        return count


def use_more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get Q6_K in Q4_K_M: the first
    and last eighth, and every third layer between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def _matrix(name: str, ne0: int, ne1: int, layer: int, shape: ModelShape) -> TensorPlan:
    """A 2-D weight and its Q4_K_M type."""
    qtype = Q4_K
    if name in ("attn_v", "ffn_down") and use_more_bits(layer, shape.n_layer):
        qtype = Q6_K
    if name == "attn_qkv":
        qtype = shape.fused_qkv_type
    return TensorPlan(f"blk.{layer}.{name}.weight", (ne0, ne1), qtype)


def _layer(shape: ModelShape, i: int) -> list[TensorPlan]:
    """One block's tensors, as llama.cpp's create_tensors names and shapes them for the arch."""
    e, q, kv = shape.n_embd, shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim

    def norm(name: str, width: int = e) -> TensorPlan:
        return TensorPlan(f"blk.{i}.{name}.weight", (width,), F32)

    if shape.arch == "phi3":  # fused q|k|v and gate|up
        return [
            norm("attn_norm"),
            _matrix("attn_qkv", e, q + 2 * kv, i, shape),
            _matrix("attn_output", q, e, i, shape),
            norm("ffn_norm"),
            _matrix("ffn_up", e, 2 * shape.n_ff, i, shape),
            _matrix("ffn_down", shape.n_ff, e, i, shape),
        ]
    attention = [
        _matrix("attn_q", e, q, i, shape),
        _matrix("attn_k", e, kv, i, shape),
        _matrix("attn_v", e, kv, i, shape),
        _matrix("attn_output", q, e, i, shape),
    ]
    ffn = [
        _matrix("ffn_gate", e, shape.n_ff, i, shape),
        _matrix("ffn_up", e, shape.n_ff, i, shape),
        _matrix("ffn_down", shape.n_ff, e, i, shape),
    ]
    if shape.arch == "command-r":  # attention and feed-forward in parallel off one norm
        return [norm("attn_norm"), *attention, *ffn]
    if shape.arch == "gemma3":
        return [
            norm("attn_norm"),
            *attention,
            norm("attn_q_norm", shape.head_dim),
            norm("attn_k_norm", shape.head_dim),
            norm("post_attention_norm"),
            norm("ffn_norm"),
            *ffn,
            norm("post_ffw_norm"),
        ]
    biases = []
    if shape.qkv_bias:
        biases = [
            TensorPlan(f"blk.{i}.attn_q.bias", (q,), F32),
            TensorPlan(f"blk.{i}.attn_k.bias", (kv,), F32),
            TensorPlan(f"blk.{i}.attn_v.bias", (kv,), F32),
        ]
    return [norm("attn_norm"), *attention, *biases, norm("ffn_norm"), *ffn]


def tensor_plan(shape: ModelShape) -> list[TensorPlan]:
    """Every tensor of the model's Q4_K_M file: the global ones, then block by block."""
    e = shape.n_embd
    embedding_type = Q6_K if shape.tied_embeddings else Q4_K  # tied: it is the output too
    tensors = [TensorPlan("token_embd.weight", (e, shape.n_vocab), embedding_type)]
    if shape.rope_freqs:
        tensors.append(TensorPlan("rope_freqs.weight", (shape.head_dim // 2,), F32))
    tensors.append(TensorPlan("output_norm.weight", (e,), F32))
    if not shape.tied_embeddings:
        tensors.append(TensorPlan("output.weight", (e, shape.n_vocab), Q6_K))
    for i in range(shape.n_layer):
        tensors += _layer(shape, i)
    return tensors


PHI4 = ModelShape(
    name="phi4",
    arch="phi3",
    n_layer=40,
    n_embd=5120,
    n_head=40,
    n_head_kv=10,
    head_dim=128,
    n_ff=17920,
    n_vocab=100352,
    n_ctx_train=16384,
    rope_base=250000.0,
    norm_eps=1e-5,
    metadata=(("rope.scaling.original_context_length", 16384), ("attention.sliding_window", 0)),
    published_bytes=9_050_000_000,
    published_as="bartowski/phi-4-GGUF phi-4-Q4_K_M.gguf: 9.05 GB (3 digits)",
)
MISTRAL = ModelShape(
    name="mistral",
    arch="llama",
    n_layer=32,
    n_embd=4096,
    n_head=32,
    n_head_kv=8,
    head_dim=128,
    n_ff=14336,
    n_vocab=32768,
    n_ctx_train=32768,
    rope_base=1e6,
    norm_eps=1e-5,
    metadata=(("vocab_size", 32768),),
    published_bytes=4_370_000_000,
    published_as="bartowski/Mistral-7B-Instruct-v0.3-GGUF Q4_K_M: 4.37 GB (3 digits)",
)
QWEN = ModelShape(
    name="qwen",
    arch="qwen2",
    n_layer=28,
    n_embd=3584,
    n_head=28,
    n_head_kv=4,
    head_dim=128,
    n_ff=18944,
    n_vocab=152064,
    n_ctx_train=32768,
    rope_base=1e6,
    norm_eps=1e-6,
    qkv_bias=True,
    published_bytes=4_680_000_000,
    published_as="bartowski/Qwen2.5-7B-Instruct-GGUF Q4_K_M: 4.68 GB (3 digits)",
)
GEMMA3 = ModelShape(
    name="gemma3",
    arch="gemma3",
    n_layer=34,
    n_embd=2560,
    n_head=8,
    n_head_kv=4,
    head_dim=256,
    n_ff=10240,
    n_vocab=262144,
    n_ctx_train=131072,
    rope_base=1e6,
    norm_eps=1e-6,
    tied_embeddings=True,
    metadata=(
        ("attention.sliding_window", 1024),
        ("rope.scaling.type", "linear"),
        ("rope.scaling.factor", 8.0),
    ),
    published_bytes=2_490_000_000,
    published_as="bartowski/google_gemma-3-4b-it-GGUF Q4_K_M: 2.49 GB (3 digits)",
)
AYA = ModelShape(
    name="aya_expanse_multilingual",
    arch="command-r",
    n_layer=32,
    n_embd=4096,
    n_head=32,
    n_head_kv=8,
    head_dim=128,
    n_ff=14336,
    n_vocab=256000,
    n_ctx_train=8192,
    rope_base=10000.0,
    norm_eps=1e-5,
    tied_embeddings=True,
    metadata=(("logit_scale", 0.125),),
    published_bytes=5_060_000_000,
    published_as="bartowski/aya-expanse-8b-GGUF Q4_K_M: 5.06 GB (3 digits)",
)
# The suite's realistic model: Llama 3.2 1B's shapes (16 layers, 2048 wide, a 128,256-token
# vocabulary tied to the output), about 0.8 GB at Q4_K_M.
LLAMA_1B = ModelShape(
    name="llama-3.2-1b",
    arch="llama",
    n_layer=16,
    n_embd=2048,
    n_head=32,
    n_head_kv=8,
    head_dim=64,
    n_ff=8192,
    n_vocab=128256,
    n_ctx_train=131072,
    rope_base=500000.0,
    norm_eps=1e-5,
    tied_embeddings=True,
    rope_freqs=True,
    metadata=(("vocab_size", 128256),),
    published_bytes=808_000_000,
    published_as="bartowski/Llama-3.2-1B-Instruct-GGUF Q4_K_M: 808 MB (3 digits)",
)

EXPERTS = {shape.name: shape for shape in (PHI4, MISTRAL, QWEN, GEMMA3, AYA)}
SHAPES = {**EXPERTS, LLAMA_1B.name: LLAMA_1B}
