"""Writes a shape-true GGUF file: the real model's metadata, tensor names, shapes and Q4_K_M
types, seeded random weights, and a SentencePiece-style vocabulary of the real size.

The weights are streamed to disk a slice at a time (a 9 GB model never sits in memory), and each
file is cached under a key of everything that decides its bytes, so a benchmark or a test pays
for a model once per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

from benchmarks.shapes.blocks import random_blocks, tensor_bytes
from benchmarks.shapes.specs import F32, ModelShape, TensorPlan, tensor_plan

GENERATOR_VERSION = 1  # bump when the bytes written for a shape change
CACHE = Path(os.environ.get("MULTISERVE_SHAPES_CACHE", "~/.cache/multiserve/shapes")).expanduser()
SLICE_VALUES = 1 << 24  # weights generated and written at a time (9 MiB of Q4_K)
SPACE = "\u2581"  # SentencePiece's word-start marker
_SPECIAL = ("<unk>", "<s>", "</s>")


def content_key(shape: ModelShape, seed: int) -> str:
    """16 hex digits naming the file's bytes: the shape (not what is said of the real file), the
    seed, the slice size (the random stream is drawn a slice at a time), the generator's version."""
    said = ("notes", "published_bytes", "published_as")
    fields = {k: v for k, v in asdict(shape).items() if k not in said}
    text = json.dumps([GENERATOR_VERSION, seed, SLICE_VALUES, fields], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_model(shape: ModelShape, seed: int = 0, cache: Path = CACHE) -> Path:
    """The model's file, written first if this machine has not got it yet."""
    path = cache / f"{shape.name}-Q4_K_M-{content_key(shape, seed)}.gguf"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".partial-{os.getpid()}")
        try:
            write_model(shape, partial, seed)
            partial.rename(path)  # whole or not at all, even with two writers at once
        finally:
            partial.unlink(missing_ok=True)
    return path


def write_model(shape: ModelShape, path: Path, seed: int = 0) -> None:
    plans = tensor_plan(shape)
    writer = GGUFWriter(path, shape.arch)
    _metadata(writer, shape)
    _vocabulary(writer, shape.n_vocab)
    for plan in plans:
        _declare(writer, plan)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = writer.fout[0]
    for plan in plans:
        writer.write_padding(out, out.tell())
        for piece in _data(plan, seed):
            piece.tofile(out)
        writer.write_padding(out, out.tell())
    writer.close()


def data_bytes(plan: TensorPlan) -> int:
    return plan.values * 4 if plan.qtype == F32 else tensor_bytes(plan.qtype, plan.values)


def _declare(writer: GGUFWriter, plan: TensorPlan) -> None:
    """The tensor's entry in the header (numpy order: rows first)."""
    if plan.qtype == F32:
        writer.add_tensor_info(plan.name, plan.dims[::-1], np.dtype(np.float32), data_bytes(plan))
        return
    row_bytes = tensor_bytes(plan.qtype, plan.dims[0])
    byte_shape = (*plan.dims[:0:-1], row_bytes)
    writer.add_tensor_info(
        plan.name, byte_shape, np.dtype(np.uint8), data_bytes(plan), raw_dtype=plan.qtype
    )


def _data(plan: TensorPlan, seed: int) -> Iterator[np.ndarray]:
    """The tensor's bytes, a slice at a time: norms of ones, biases of zeros, random blocks."""
    if plan.qtype == F32:
        fill = 0.0 if plan.name.endswith(".bias") else 1.0
        yield np.full(plan.values, fill, dtype=np.float32)
        return
    rng = np.random.default_rng([seed, zlib.crc32(plan.name.encode())])
    row = plan.dims[0]
    rows_per_slice = max(1, SLICE_VALUES // row)
    rows = plan.values // row
    for start in range(0, rows, rows_per_slice):
        yield random_blocks(plan.qtype, min(rows_per_slice, rows - start) * row, rng)


def _metadata(writer: GGUFWriter, shape: ModelShape) -> None:
    arch = shape.arch
    writer.add_name(f"{shape.name} (shape-true, random weights)")
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_quantization_version(2)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_base)
    if arch == "command-r":
        writer.add_layer_norm_eps(shape.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(shape.norm_eps)
    for key, value in shape.metadata:
        name = f"{arch}.{key}"
        if isinstance(value, str):
            writer.add_string(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
        else:
            assert isinstance(value, int)
            writer.add_uint32(name, value)


def _vocabulary(writer: GGUFWriter, n_vocab: int) -> None:
    """A SentencePiece-style vocabulary of exactly `n_vocab` tokens (the embedding's rows):
    <unk>, <s>, </s>, the 256 byte tokens, then word pieces."""
    tokens = [*_SPECIAL, *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [f"{SPACE}w{i}" for i in range(n_vocab - len(tokens))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    types += [TokenType.BYTE] * 256 + [TokenType.NORMAL] * (n_vocab - len(_SPECIAL) - 256)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(
        [0.0] * (len(_SPECIAL) + 256) + [-float(i) for i in range(n_vocab - 259)]
    )
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
