"""Fast, strict GGUF header reader that needs no llama.cpp.

The API process reads a model's header for two reasons: to estimate memory before loading
(weights size, KV cache from layer/head metadata) and to reject hostile or corrupt files before
llama.cpp parses them (GGUF out-of-bounds reads are a known attack surface). `gguf.GGUFReader`
is too slow for this (it builds Python objects for every vocabulary token), so this module walks
the header with `mmap` + `struct.unpack_from`, bounds every read by the file size, and only
summarises large arrays (item type and count).

Layout (little-endian, versions 2 and 3)::

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x   (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, i64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` | tensor data

A string is a u64 byte length followed by that many bytes (UTF-8, no terminator).
"""

from __future__ import annotations

import itertools
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUFValueType

__all__ = ["ArrayInfo", "GGUFError", "GGUFHeader", "TensorInfo", "read_header"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 1_000_000
MAX_KVS = 100_000
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63  # ggml_tensor.name is char[GGML_MAX_NAME = 64], NUL included
MAX_SMALL_ARRAY = 64  # arrays up to this length keep their values
INT64_MAX = 2**63 - 1
ALIGNMENT_KEY = "general.alignment"

_FIXED = struct.Struct("<4sIQQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Smallest possible encodings, used to reject counts the file cannot possibly hold.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, one-byte value
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

# struct formats of the fixed-size value types; ids come from gguf's enum.
_SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_SCALAR_STRUCTS = {t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}
# Plain int ids: `int(enum) in dict` works either way, this keeps lookups cheap.
_QUANT_SIZES: dict[int, tuple[int, int]] = {int(t): s for t, s in GGML_QUANT_SIZES.items()}


class GGUFError(ValueError):
    """File is not a valid GGUF.

    The message says what is wrong and is safe for clients and logs: it never contains the
    file path, and names read from the file are shown escaped and truncated.
    """


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array; values are kept only for short arrays of numbers, bools or strings."""

    item_type: int
    count: int
    values: tuple | None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; `offset` is relative to `GGUFHeader.data_offset`."""

    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (ne[0])
    ggml_type: int
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """Everything in a GGUF file except the tensor data itself."""

    version: int
    metadata: dict[str, object]
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    file_size: int

    @property
    def architecture(self) -> str:
        """`general.architecture`, the prefix of the model's own metadata keys."""
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else "unknown"

    def arch_value(self, key: str, default: object = None) -> object:
        """Architecture-scoped metadata, e.g. `arch_value("block_count")`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def weights_bytes(self) -> int:
        """Bytes of tensor data: what loading the model maps into memory."""
        return sum(t.n_bytes for t in self.tensors)


def read_header(path: Path) -> GGUFHeader:
    """Parse and validate the header of the GGUF file at `path`.

    Raises GGUFError for anything malformed; OSError only for file-system problems.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise GGUFError("not a regular file")
        if st.st_size < _FIXED.size:
            raise GGUFError(
                f"file is {st.st_size} bytes, shorter than the {_FIXED.size}-byte header"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf)


class _Cursor:
    """Read position over the mapped file; every read is checked against the file size."""

    __slots__ = ("buf", "pos", "size")

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)

    def take(self, n: int, what: str) -> int:
        """Advance past `n` bytes and return where they start."""
        start = self.pos
        if n > self.size - start:
            raise GGUFError(f"{what} at offset {start} ends past the end of the file")
        self.pos = start + n
        return start

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack_from(self.buf, self.take(st.size, what))

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)[0]

    def u64(self, what: str) -> int:
        return self.unpack(_U64, what)[0]

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        start = self.take(n, what)
        return self.buf[start : start + n]


def _show(name: str) -> str:
    """A file-supplied name made safe for messages: escaped and truncated."""
    return repr(name if len(name) <= 80 else name[:80] + "...")


def _parse(buf: mmap.mmap) -> GGUFHeader:
    cur = _Cursor(buf)
    magic, version, n_tensors, n_kv = cur.unpack(_FIXED, "header")
    if magic != MAGIC:
        raise GGUFError(f"bad magic {magic!r}, expected {MAGIC!r}: not a GGUF file")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"unsupported GGUF version {version} (supported: 2, 3)")
    _check_counts(n_tensors, n_kv, cur.size)
    metadata = _read_metadata(cur, n_kv)
    alignment = _alignment(metadata)
    infos = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = _check_tensor_data(infos, data_offset, alignment, cur.size)
    return GGUFHeader(version, metadata, tensors, data_offset, cur.size)


def _check_counts(n_tensors: int, n_kv: int, size: int) -> None:
    """Reject counts that are absurd or that the file is too small to hold."""
    if n_kv > MAX_KVS:
        raise GGUFError(f"kv_count {n_kv} is absurd (limit {MAX_KVS})")
    if n_tensors > MAX_TENSORS:
        raise GGUFError(f"tensor_count {n_tensors} is absurd (limit {MAX_TENSORS})")
    if _FIXED.size + n_kv * _MIN_KV_BYTES > size:
        raise GGUFError(f"kv_count {n_kv} is impossible for a file of {size} bytes")
    if _FIXED.size + n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > size:
        raise GGUFError(f"tensor_count {n_tensors} is impossible for a file of {size} bytes")


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, object]:
    metadata: dict[str, object] = {}
    for i in range(n_kv):
        raw = cur.raw_string(f"key of metadata entry {i}")
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"key of metadata entry {i} is not valid UTF-8") from None
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {_show(key)}")
        value_type = cur.u32(f"value type of {_show(key)}")
        if key == ALIGNMENT_KEY and value_type != GGUFValueType.UINT32:
            # llama.cpp asserts (aborts the process) on any other type.
            raise GGUFError(f"{ALIGNMENT_KEY} must be of type uint32, not type {value_type}")
        metadata[key] = _read_value(cur, value_type, key)
    return metadata


def _read_value(cur: _Cursor, value_type: int, key: str) -> object:
    if value_type == GGUFValueType.STRING:
        # llama.cpp does not validate value strings either; never reject a file on this.
        return cur.raw_string(f"value of {_show(key)}").decode("utf-8", errors="replace")
    if value_type == GGUFValueType.ARRAY:
        return _read_array(cur, key)
    st = _SCALAR_STRUCTS.get(value_type)
    if st is None:
        raise GGUFError(f"metadata {_show(key)} has unknown value type {value_type}")
    return cur.unpack(st, f"value of {_show(key)}")[0]


def _read_array(cur: _Cursor, key: str) -> ArrayInfo:
    item_type = cur.u32(f"item type of array {_show(key)}")
    count = cur.u64(f"length of array {_show(key)}")
    if item_type == GGUFValueType.ARRAY:
        raise GGUFError(f"metadata {_show(key)} is a nested array, which GGUF does not allow")
    if item_type == GGUFValueType.STRING:
        return ArrayInfo(item_type, count, _read_string_items(cur, count, key))
    st = _SCALAR_STRUCTS.get(item_type)
    if st is None:
        raise GGUFError(f"array {_show(key)} has unknown item type {item_type}")
    start = cur.take(count * st.size, f"items of array {_show(key)}")
    values = None
    if count <= MAX_SMALL_ARRAY:
        values = struct.unpack_from(f"<{count}{_SCALAR_FORMATS[item_type]}", cur.buf, start)
    return ArrayInfo(item_type, count, values)


def _read_string_items(cur: _Cursor, count: int, key: str) -> tuple[str, ...] | None:
    """Decode a short string array; walk a long one (a vocabulary) keeping nothing."""
    what = f"items of array {_show(key)}"
    if count * 8 > cur.size - cur.pos:  # every item needs at least its length field
        raise GGUFError(f"{what} at offset {cur.pos} ends past the end of the file")
    if count <= MAX_SMALL_ARRAY:
        return tuple(cur.raw_string(what).decode("utf-8", errors="replace") for _ in range(count))
    cur.pos = _skip_strings(cur.buf, cur.pos, count, cur.size, what)
    return None


def _skip_strings(buf: mmap.mmap, pos: int, count: int, end: int, what: str) -> int:
    """Hot loop (one iteration per vocabulary token): one bound check, one unpack."""
    unpack = _U64.unpack_from
    limit = end - 8
    for _ in range(count):
        if pos > limit:
            raise GGUFError(f"{what} ends past the end of the file")
        pos += 8 + unpack(buf, pos)[0]
    if pos > end:
        raise GGUFError(f"{what} ends past the end of the file")
    return pos


def _alignment(metadata: dict[str, object]) -> int:
    """`general.alignment` (a u32, checked while reading): tensor data and offsets align to it."""
    value = metadata.get(ALIGNMENT_KEY, GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise GGUFError(f"{ALIGNMENT_KEY} {value} is not a power of two")
    return value


def _read_tensor_info(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor entry, with the checks that need only the entry itself."""
    raw = cur.raw_string(f"name of tensor {index}")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GGUFError(f"name of tensor {index} is not valid UTF-8") from None
    if len(raw) > MAX_TENSOR_NAME:
        raise GGUFError(f"tensor {_show(name)} name is longer than {MAX_TENSOR_NAME} bytes")
    shown = _show(name)
    n_dims = cur.u32(f"n_dims of tensor {shown}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"tensor {shown} has {n_dims} dimensions (must be 1 to {MAX_DIMS})")
    shape = cur.unpack(struct.Struct(f"<{n_dims}q"), f"shape of tensor {shown}")
    ggml_type = cur.u32(f"type of tensor {shown}")
    offset = cur.u64(f"offset of tensor {shown}")
    return name, shape, ggml_type, offset


def _tensor_bytes(name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    """Data size of a contiguous tensor, after checking its shape against its type."""
    shown = _show(name)
    sizes = _QUANT_SIZES.get(ggml_type)
    if sizes is None:
        raise GGUFError(f"tensor {shown} has unknown ggml type {ggml_type}")
    if any(d <= 0 for d in shape):
        raise GGUFError(f"tensor {shown} has a non-positive dimension in shape {list(shape)}")
    block_size, type_size = sizes
    if shape[0] % block_size:
        raise GGUFError(
            f"tensor {shown} row length {shape[0]} is not a multiple of its type's "
            f"block size {block_size}"
        )
    n_elements = 1
    for d in shape:
        n_elements *= d
    n_bytes = n_elements // block_size * type_size
    if n_elements > INT64_MAX or n_bytes > INT64_MAX:
        raise GGUFError(f"tensor {shown} shape {list(shape)} overflows int64")
    return n_bytes


def _check_tensor_data(
    infos: list[tuple[str, tuple[int, ...], int, int]], data_offset: int, alignment: int, size: int
) -> tuple[TensorInfo, ...]:
    """Build TensorInfos, checking names are unique and data regions aligned, in-file and
    disjoint."""
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for name, shape, ggml_type, offset in infos:
        if name in seen:
            raise GGUFError(f"duplicate tensor name {_show(name)}")
        seen.add(name)
        n_bytes = _tensor_bytes(name, shape, ggml_type)
        if offset % alignment:
            raise GGUFError(f"tensor {_show(name)} offset {offset} is not {alignment}-aligned")
        if data_offset + offset + n_bytes > size:
            raise GGUFError(f"tensor {_show(name)} data ends past the end of the file")
        tensors.append(TensorInfo(name, shape, ggml_type, offset, n_bytes))
    by_offset = sorted(tensors, key=lambda t: t.offset)
    for prev, nxt in itertools.pairwise(by_offset):
        if nxt.offset < prev.offset + prev.n_bytes:
            raise GGUFError(f"tensor {_show(nxt.name)} data overlaps tensor {_show(prev.name)}")
    return tuple(tensors)
