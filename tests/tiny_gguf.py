"""Generate tiny, random-weight GGUF models that llama.cpp really loads and runs.

The model is a 2-layer "llama" architecture (RMSNorm, RoPE, GQA, SwiGLU FFN) with a small
SentencePiece-style ("llama") vocabulary with byte fallback. The weights are random, so the
generated text is gibberish, but tokenization, decoding, sampling, chat templates, special
tokens and EOG handling all behave like they do with a real model.

Usage::

    from tiny_gguf import write_tiny_model

    path = write_tiny_model(tmp_path / "tiny.gguf", seed=0)

The vocabulary does not depend on any argument, so the token ids exported below
(``BOS_ID``, ``EOS_ID``, ``START_OF_TURN_ID``, ...) hold for every generated file.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, Keys, LlamaFileType, PoolingType, TokenType

__all__ = [
    "BOS_ID",
    "BYTE_OFFSET",
    "END_OF_TURN",
    "END_OF_TURN_ID",
    "EOS_ID",
    "N_FF",
    "N_HEAD",
    "N_HEAD_KV",
    "N_VOCAB",
    "START_OF_TURN",
    "START_OF_TURN_ID",
    "TOKENS",
    "TOKEN_TO_ID",
    "TOKEN_TYPES",
    "TOOL_CALLS_ID",
    "TOOL_CALL_OPEN_ID",
    "UNK_ID",
    "byte_token_id",
    "write_tiny_model",
]

ARCH = "llama"
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
RMS_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0

SPACE = "\u2581"  # "▁", SentencePiece's whitespace marker

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3  # <0x00> has id 3, <0xFF> has id 258

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALLS = "[TOOL_CALLS]"

# A few dozen common English words; each one becomes "▁word" (plus the prefix chain
# "▁w", "▁wo", ... so SentencePiece-style bigram merging can actually reach it).
_WORDS = (
    "hello", "world", "the", "be", "to", "of", "and", "a", "in", "that", "have", "I", "it",
    "for", "not", "on", "with", "he", "as", "you", "do", "at", "this", "but", "his", "by",
    "from", "they", "we", "say", "her", "she", "or", "an", "will", "my", "one", "all", "would",
    "there", "their", "what", "so", "up", "out", "if", "about", "who", "get", "which", "go",
    "me", "is", "are", "was", "how", "can", "yes", "no", "hi", "Hello", "The", "model", "user",
    "assistant", "test", "tiny", "good", "day", "cat", "dog", "red", "blue",
)  # fmt: skip

# Extra multi-character pieces (each builds on pieces that already exist).
_PIECES = (
    "th", "he", "in", "er", "an", "re", "on", "en", "at", "or", "es", "ed", "st", "ll",
    "ou", "ing", "the", "and", "ion", "tion",
)  # fmt: skip

_SINGLE_CHARS = string.ascii_letters + string.digits + string.punctuation


def _build_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []

    def add(text: str, ttype: TokenType, score: float = 0.0) -> None:
        tokens.append(text)
        scores.append(score)
        types.append(int(ttype))

    add("<unk>", TokenType.UNKNOWN)
    add("<s>", TokenType.CONTROL)
    add("</s>", TokenType.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", TokenType.BYTE)

    # Normal pieces, most "valuable" first. Scores strictly descend: in SPM merging the
    # highest-scoring bigram wins, so the "▁word" prefix chains (listed first) beat the
    # generic multi-character pieces and whole words tokenize as one token.
    normal: dict[str, None] = {SPACE: None}
    for word in _WORDS:
        piece = SPACE + word
        for k in range(2, len(piece) + 1):
            normal[piece[:k]] = None
    for piece in _PIECES:
        normal[piece] = None
    for ch in _SINGLE_CHARS:
        normal[ch] = None
    for i, piece in enumerate(normal):
        add(piece, TokenType.NORMAL, -float(i))

    add(START_OF_TURN, TokenType.CONTROL)
    add(END_OF_TURN, TokenType.CONTROL)
    # Tool-call markers as their families' vocabularies have them: Qwen's are user-defined
    # (always shown as text), Mistral's is a control token.
    add(TOOL_CALL_OPEN, TokenType.USER_DEFINED)
    add("</tool_call>", TokenType.USER_DEFINED)
    add(TOOL_CALLS, TokenType.CONTROL)
    return tokens, scores, types


_tokens, _scores, _types = _build_vocab()
TOKENS: tuple[str, ...] = tuple(_tokens)
TOKEN_TYPES: tuple[int, ...] = tuple(_types)
_SCORES: tuple[float, ...] = tuple(_scores)
del _tokens, _scores, _types

TOKEN_TO_ID: dict[str, int] = {t: i for i, t in enumerate(TOKENS)}
N_VOCAB = len(TOKENS)
START_OF_TURN_ID = TOKEN_TO_ID[START_OF_TURN]
END_OF_TURN_ID = TOKEN_TO_ID[END_OF_TURN]
TOOL_CALL_OPEN_ID = TOKEN_TO_ID[TOOL_CALL_OPEN]
TOOL_CALLS_ID = TOKEN_TO_ID[TOOL_CALLS]
assert len(TOKEN_TO_ID) == N_VOCAB, "duplicate token in tiny vocab"


def byte_token_id(b: int) -> int:
    """Id of the byte-fallback token ``<0xNN>`` for byte value ``b``."""
    if not 0 <= b <= 255:
        raise ValueError(f"not a byte: {b}")
    return BYTE_OFFSET + b


def write_tiny_model(
    path: Path,
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_ctx_train: int = 4096,
    chat_template: str | None = None,
    name: str = "tiny",
    pooling_type: int | None = None,
) -> Path:
    """Write a tiny random-weight llama-architecture GGUF model to ``path`` and return it.

    Deterministic: the same arguments always produce a byte-identical file. 2-D weight
    matrices are stored as F16, norm vectors as F32.
    """
    if n_embd % (2 * N_HEAD) != 0:
        raise ValueError(f"n_embd must be a multiple of {2 * N_HEAD}, got {n_embd}")
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    head_dim = n_embd // N_HEAD
    n_embd_kv = head_dim * N_HEAD_KV
    rng = np.random.default_rng(seed)

    # NOTE: the gguf writer stores numpy shapes reversed, as ggml "ne": a numpy array of
    # shape (rows, cols) becomes ne = [cols, rows]. llama.cpp wants e.g. attn_q with
    # ne = [n_embd, n_head * head_dim], i.e. numpy shape (n_head * head_dim, n_embd).
    def mat(rows: int, cols: int, std: float) -> np.ndarray:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)
        return w.astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    std = 0.02
    std_resid = std / np.sqrt(2.0 * n_layer)  # GPT-2 style scaling of residual projections
    # A larger output projection spreads the logits (std ~2) so sampling is not uniform.
    std_out = 2.0 / np.sqrt(n_embd)

    writer = GGUFWriter(path, ARCH)
    try:
        writer.add_name(name)
        writer.add_file_type(int(LlamaFileType.MOSTLY_F16))
        writer.add_vocab_size(N_VOCAB)
        writer.add_context_length(n_ctx_train)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(ROPE_FREQ_BASE)
        writer.add_layer_norm_rms_eps(RMS_EPS)
        if pooling_type is not None:  # as embedding models name theirs (1 mean, 2 cls, 3 last)
            writer.add_pooling_type(PoolingType(pooling_type))

        writer.add_tokenizer_model("llama")
        writer.add_token_list(list(TOKENS))
        writer.add_token_scores(list(_SCORES))
        writer.add_token_types(list(TOKEN_TYPES))
        writer.add_unk_token_id(UNK_ID)
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)
        writer.add_uint32(Keys.Tokenizer.EOT_ID, END_OF_TURN_ID)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)

        writer.add_tensor("token_embd.weight", mat(N_VOCAB, n_embd, std))
        for i in range(n_layer):
            p = f"blk.{i}"
            writer.add_tensor(f"{p}.attn_norm.weight", norm())
            writer.add_tensor(f"{p}.attn_q.weight", mat(n_embd, n_embd, std))
            writer.add_tensor(f"{p}.attn_k.weight", mat(n_embd_kv, n_embd, std))
            writer.add_tensor(f"{p}.attn_v.weight", mat(n_embd_kv, n_embd, std))
            writer.add_tensor(f"{p}.attn_output.weight", mat(n_embd, n_embd, std_resid))
            writer.add_tensor(f"{p}.ffn_norm.weight", norm())
            writer.add_tensor(f"{p}.ffn_gate.weight", mat(N_FF, n_embd, std))
            writer.add_tensor(f"{p}.ffn_up.weight", mat(N_FF, n_embd, std))
            writer.add_tensor(f"{p}.ffn_down.weight", mat(n_embd, N_FF, std_resid))
        writer.add_tensor("output_norm.weight", norm())
        writer.add_tensor("output.weight", mat(N_VOCAB, n_embd, std_out))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
