"""The strict GGUF header reader: agrees with gguf's own reader on valid files, and turns every
corrupt or hostile file into a GGUFError (never IndexError, struct.error, MemoryError, ...)."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from multiserve.fleet.gguf_header import ArrayInfo, GGUFError, read_header
from tiny_gguf import N_VOCAB, write_tiny_model

N_LAYER = 2
TENSORS_PER_LAYER = 9
F32 = int(GGMLQuantizationType.F32)
F16 = int(GGMLQuantizationType.F16)
STRING = int(GGUFValueType.STRING)
ARRAY = int(GGUFValueType.ARRAY)
UINT32 = int(GGUFValueType.UINT32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf", n_layer=N_LAYER)


@pytest.fixture(scope="module")
def tiny_bytes(tiny: Path) -> bytes:
    return tiny.read_bytes()


def expect_error(path: Path, data: bytes, match: str | None = None) -> GGUFError:
    """Write `data` to `path` and check it is rejected with a path-free GGUFError."""
    path.write_bytes(data)
    with pytest.raises(GGUFError, match=match) as info:
        read_header(path)
    message = str(info.value)
    assert path.name not in message and str(path.parent) not in message
    return info.value


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def tensor_fields(data: bytes, name: str) -> dict[str, int]:
    """Byte offsets of one tensor-info entry's fields, found via its length-prefixed name."""
    raw = name.encode()
    start = data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
    n_dims = struct.unpack_from("<I", data, start)[0]
    dims = start + 4
    ggml_type = dims + 8 * n_dims
    return {"n_dims": start, "dims": dims, "type": ggml_type, "offset": ggml_type + 4}


# --- a minimal hand-written encoder, independent of the parser, for targeted corruptions ---


def enc_str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, value_type: int, payload: bytes) -> bytes:
    return enc_str(key) + struct.pack("<I", value_type) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, UINT32, struct.pack("<I", value))


def tensor(name: str, shape: tuple[int, ...], ggml_type: int = F32, offset: int = 0) -> bytes:
    dims = struct.pack(f"<{len(shape)}q", *shape)
    return (
        enc_str(name) + struct.pack("<I", len(shape)) + dims + struct.pack("<IQ", ggml_type, offset)
    )


def build(
    kvs: list[bytes], tensors: list[bytes], data_size: int = 64, version: int = 3, align: int = 32
) -> bytes:
    head = struct.pack("<4sIQQ", b"GGUF", version, len(tensors), len(kvs))
    head += b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * ((-len(head)) % align + data_size)


ARCH_KV = kv("general.architecture", STRING, enc_str("llama"))


# --- valid files ---


def test_tiny_model_header(tiny: Path) -> None:
    header = read_header(tiny)
    assert header.version == 3
    assert header.architecture == "llama"
    assert header.arch_value("block_count") == N_LAYER
    assert header.arch_value("no_such_key", 7) == 7
    assert len(header.tensors) == 2 + N_LAYER * TENSORS_PER_LAYER + 1
    by_name = {t.name: t for t in header.tensors}
    assert by_name["token_embd.weight"].shape == (64, N_VOCAB)
    assert by_name["token_embd.weight"].ggml_type == F16
    assert by_name["blk.0.attn_norm.weight"].shape == (64,)
    assert by_name["blk.1.ffn_down.weight"].shape == (128, 64)
    assert header.weights_bytes == sum(t.n_bytes for t in header.tensors)
    assert header.weights_bytes <= header.file_size == tiny.stat().st_size
    assert header.data_offset % 32 == 0
    tokens = header.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, ArrayInfo)
    assert (tokens.item_type, tokens.count, tokens.values) == (STRING, N_VOCAB, None)


def test_agrees_with_gguf_reader(tiny: Path) -> None:
    header = read_header(tiny)
    reference = GGUFReader(tiny)
    assert [t.name for t in header.tensors] == [t.name for t in reference.tensors]
    for mine, ref in zip(header.tensors, reference.tensors, strict=True):
        assert header.data_offset + mine.offset == ref.data_offset
        assert mine.n_bytes == ref.n_bytes
        assert mine.shape == tuple(int(d) for d in ref.shape)
        assert mine.ggml_type == int(ref.tensor_type)


def test_small_arrays_keep_values_and_alignment_is_honoured(tmp_path: Path) -> None:
    data = build(
        [
            ARCH_KV,
            kv_u32("general.alignment", 64),
            kv("a.ints", ARRAY, struct.pack("<IQ3i", int(GGUFValueType.INT32), 3, -1, 0, 5)),
            kv("a.strs", ARRAY, struct.pack("<IQ", STRING, 2) + enc_str("x") + enc_str("yz")),
            kv("a.big", ARRAY, struct.pack("<IQ", UINT32, 65) + b"\0" * 4 * 65),
            kv("a.flag", int(GGUFValueType.BOOL), b"\x01"),
        ],
        [tensor("w", (8, 2), offset=0), tensor("b", (8,), offset=64)],
        data_size=128,
        align=64,
    )
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    header = read_header(path)
    assert header.data_offset % 64 == 0
    assert header.metadata["a.ints"] == ArrayInfo(int(GGUFValueType.INT32), 3, (-1, 0, 5))
    assert header.metadata["a.strs"] == ArrayInfo(STRING, 2, ("x", "yz"))
    assert header.metadata["a.big"] == ArrayInfo(UINT32, 65, None)
    assert header.metadata["a.flag"] is True
    assert header.weights_bytes == 8 * 2 * 4 + 8 * 4


def test_default_model_parses_fast() -> None:
    default = pytest.importorskip("multiserve.models.default")
    path = default.default_model_path(show_progress=False)
    start = time.perf_counter()
    header = read_header(path)
    elapsed = time.perf_counter() - start
    assert header.architecture == "gemma3"
    assert len(header.tensors) == 236
    assert header.weights_bytes <= header.file_size
    assert elapsed < 1.0


# --- corruptions of the real tiny model ---


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    expect_error(tmp_path / "empty.gguf", b"", "shorter than")
    expect_error(tmp_path / "three.gguf", b"GGU", "shorter than")


def test_bad_magic_and_version(tmp_path: Path, tiny_bytes: bytes) -> None:
    expect_error(tmp_path / "m.gguf", b"GGML" + tiny_bytes[4:], "bad magic")
    expect_error(tmp_path / "m.gguf", patch(tiny_bytes, 4, "<I", 99), "version 99")
    expect_error(tmp_path / "m.gguf", patch(tiny_bytes, 4, "<I", 1), "version 1")


def test_truncated_anywhere(tmp_path: Path, tiny: Path, tiny_bytes: bytes) -> None:
    header_end = read_header(tiny).data_offset
    span = header_end + 4096  # through the whole header and into the tensor data
    cuts = [span * i // 40 for i in range(40)] + [header_end, len(tiny_bytes) - 1]
    for cut in cuts:
        expect_error(tmp_path / "cut.gguf", tiny_bytes[:cut])


def test_huge_string_length(tmp_path: Path, tiny_bytes: bytes) -> None:
    # The first key's length field directly follows the 24-byte fixed header.
    expect_error(tmp_path / "m.gguf", patch(tiny_bytes, 24, "<Q", 2**62), "past the end")


def test_huge_counts(tmp_path: Path, tiny_bytes: bytes) -> None:
    expect_error(tmp_path / "m.gguf", patch(tiny_bytes, 16, "<Q", 2**63), "kv_count")
    expect_error(tmp_path / "m.gguf", patch(tiny_bytes, 8, "<Q", 2**63), "tensor_count")
    # Below the absurdity limits but more than the file can hold.
    expect_error(tmp_path / "m.gguf", patch(tiny_bytes, 16, "<Q", 90_000), "impossible")
    expect_error(tmp_path / "m.gguf", patch(tiny_bytes, 8, "<Q", 900_000), "impossible")


def test_unknown_value_type(tmp_path: Path, tiny_bytes: bytes) -> None:
    key_len = struct.unpack_from("<Q", tiny_bytes, 24)[0]
    data = patch(tiny_bytes, 24 + 8 + key_len, "<I", 99)
    expect_error(tmp_path / "m.gguf", data, "unknown value type 99")


@pytest.mark.parametrize(
    ("field", "fmt", "value", "match"),
    [
        ("dims", "<q", 0, "non-positive dimension"),
        ("dims", "<q", -64, "non-positive dimension"),
        ("n_dims", "<I", 0, "0 dimensions"),
        ("n_dims", "<I", 5, "5 dimensions"),
        ("type", "<I", 99, "unknown ggml type 99"),
        ("type", "<I", 31, "unknown ggml type 31"),  # Q4_0_4_4, removed from ggml
        ("offset", "<Q", 2**40, "ends past the end of the file"),
        ("offset", "<Q", 2**64 - 32, "ends past the end of the file"),
        ("offset", "<Q", 1, "not 32-aligned"),
    ],
)
def test_corrupt_tensor_info(
    tmp_path: Path, tiny_bytes: bytes, field: str, fmt: str, value: int, match: str
) -> None:
    fields = tensor_fields(tiny_bytes, "blk.1.ffn_down.weight")
    expect_error(tmp_path / "m.gguf", patch(tiny_bytes, fields[field], fmt, value), match)


def test_row_not_a_multiple_of_block_size(tmp_path: Path, tiny_bytes: bytes) -> None:
    # ffn_down rows are 128 F16 values; as Q4_K (256-value blocks) that is not whole blocks.
    fields = tensor_fields(tiny_bytes, "blk.1.ffn_down.weight")
    data = patch(tiny_bytes, fields["type"], "<I", int(GGMLQuantizationType.Q4_K))
    expect_error(tmp_path / "m.gguf", data, "row length 128 is not a multiple of .* 256")


def test_overlapping_tensors(tmp_path: Path, tiny_bytes: bytes) -> None:
    first = struct.unpack_from(
        "<Q", tiny_bytes, tensor_fields(tiny_bytes, "output.weight")["offset"]
    )
    data = patch(
        tiny_bytes, tensor_fields(tiny_bytes, "blk.0.attn_q.weight")["offset"], "<Q", *first
    )
    expect_error(tmp_path / "m.gguf", data, "overlaps")


def test_message_names_the_tensor(tmp_path: Path, tiny_bytes: bytes) -> None:
    name = "blk.0.attn_q.weight"
    data = patch(tiny_bytes, tensor_fields(tiny_bytes, name)["offset"], "<Q", 2**40)
    error = expect_error(tmp_path / "m.gguf", data)
    assert str(error) == f"tensor '{name}' data ends past the end of the file"


# --- hand-built files for checks the tiny model cannot reach by patching ---

HAND_BUILT: dict[str, tuple[Callable[[], bytes], str]] = {
    "nested array": (
        lambda: build([ARCH_KV, kv("x", ARRAY, struct.pack("<IQ", ARRAY, 1))], []),
        "nested array",
    ),
    "array item type": (
        lambda: build([kv("x", ARRAY, struct.pack("<IQ", 77, 1))], []),
        "unknown item type 77",
    ),
    "array count": (
        lambda: build([kv("x", ARRAY, struct.pack("<IQ", UINT32, 2**61))], []),
        "past the end",
    ),
    "string array count": (
        lambda: build([kv("x", ARRAY, struct.pack("<IQ", STRING, 2**61))], []),
        "past the end",
    ),
    "long string array item": (
        lambda: build(
            [
                kv(
                    "x",
                    ARRAY,
                    struct.pack("<IQ", STRING, 100) + enc_str("a") + struct.pack("<Q", 2**62),
                )
            ],
            [],
            data_size=2000,
        ),
        "past the end",
    ),
    "duplicate key": (lambda: build([kv_u32("k", 1), kv_u32("k", 2)], []), "duplicate metadata"),
    "key utf-8": (lambda: build([kv_u32(b"\xff\xfe", 1)], []), "not valid UTF-8"),
    "duplicate tensor": (
        lambda: build([], [tensor("w", (8,)), tensor("w", (8,), offset=32)]),
        "duplicate tensor name 'w'",
    ),
    "tensor name utf-8": (
        lambda: build([], [enc_str(b"\xc3") + struct.pack("<IqIQ", 1, 8, F32, 0)]),
        "not valid UTF-8",
    ),
    "tensor name length": (lambda: build([], [tensor("n" * 64, (8,))]), "longer than 63"),
    "int64 overflow": (lambda: build([], [tensor("w", (2**32, 2**32))]), "overflows int64"),
    "bytes overflow": (lambda: build([], [tensor("w", (2**31, 2**31), F32)]), "overflows int64"),
    "alignment not power of two": (
        lambda: build([kv_u32("general.alignment", 48)], [], align=48),
        "not a power of two",
    ),
    "alignment zero": (lambda: build([kv_u32("general.alignment", 0)], []), "power of two"),
    "alignment type": (
        lambda: build([kv("general.alignment", STRING, enc_str("32"))], []),
        "must be of type uint32",
    ),
    "alignment int32": (
        lambda: build(
            [kv("general.alignment", int(GGUFValueType.INT32), struct.pack("<i", 32))], []
        ),
        "must be of type uint32",
    ),
}


@pytest.mark.parametrize("case", sorted(HAND_BUILT))
def test_hand_built_corruptions(tmp_path: Path, case: str) -> None:
    make, match = HAND_BUILT[case]
    expect_error(tmp_path / "m.gguf", make(), match)


# --- random mutations: parse or GGUFError, nothing else ---


def test_random_mutations_parse_or_raise_gguf_error(
    tmp_path: Path, tiny: Path, tiny_bytes: bytes
) -> None:
    rng = random.Random(0)
    limit = min(4096, read_header(tiny).data_offset)
    path = tmp_path / "mutant.gguf"
    outcomes = {"parsed": 0, "rejected": 0}
    for _ in range(300):
        data = bytearray(tiny_bytes)
        if rng.random() < 0.5:
            data[rng.randrange(limit)] = rng.randrange(256)
        else:
            struct.pack_into("<I", data, rng.randrange(limit - 3), rng.getrandbits(32))
        path.write_bytes(data)
        try:
            read_header(path)
        except GGUFError:
            outcomes["rejected"] += 1
        else:
            outcomes["parsed"] += 1
    assert outcomes["rejected"] > 0 and outcomes["parsed"] > 0
