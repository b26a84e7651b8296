"""The tiny GGUF generator produces files llama.cpp really loads, tokenizes and decodes, in the
very context the server gives a model (a unified KV cache, flash attention, its batch sizes)."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from multiserve.config import ModelSpec
from multiserve.engine.runtime import Runtime
from multiserve.fleet.manager import worker_config
from tiny_gguf import (
    BOS_ID,
    END_OF_TURN,
    END_OF_TURN_ID,
    EOS_ID,
    N_VOCAB,
    SPACE,
    START_OF_TURN,
    START_OF_TURN_ID,
    TOKEN_TO_ID,
    byte_token_id,
    write_tiny_model,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
N_CTX = 256
N_CTX_TRAIN = 2048


@dataclass
class Loaded:
    model: object
    ctx: object
    vocab: object


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return write_tiny_model(
        path, seed=1, n_ctx_train=N_CTX_TRAIN, chat_template=CHAT_TEMPLATE, name="tiny-test"
    )


def _load_model(path: Path) -> object:
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    assert model, f"llama.cpp failed to load {path}"
    return model


@pytest.fixture(scope="module")
def loaded(model_path: Path) -> Iterator[Loaded]:
    # built by the server's own code from a model spec with its defaults, so the tests below run
    # on whatever context a worker would create (2 slots of N_CTX, one step of N_CTX tokens)
    spec = ModelSpec(id="tiny-test", path=model_path, n_ctx=N_CTX, n_parallel=2, step_tokens=N_CTX)
    runtime = Runtime(worker_config(spec, threads=2))
    try:
        yield Loaded(model=runtime.model, ctx=runtime.ctx, vocab=runtime.vocab)
    finally:
        runtime.close()


# ---------------------------------------------------------------- helpers


def tokenize(vocab: object, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    data = text.encode("utf-8")
    n_max = len(data) + 8
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    assert n >= 0, f"llama_tokenize returned {n}"
    return list(buf[:n])


def token_to_piece(vocab: object, token: int, *, special: bool = False) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    assert n >= 0
    return buf.raw[:n]


def logits_ith(ctx: object, i: int) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(ctx, i)
    assert ptr, "no logits"
    return np.ctypeslib.as_array(ptr, shape=(N_VOCAB,)).copy()


def clear_memory(ctx: object) -> None:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)


def decode_get_one(ctx: object, tokens: list[int]) -> np.ndarray:
    """Decode with llama_batch_get_one and return the logits of the last token."""
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)  # must outlive llama_decode
    batch = llama_cpp.llama_batch_get_one(arr, len(tokens))
    rc = llama_cpp.llama_decode(ctx, batch)
    assert rc == 0, f"llama_decode returned {rc}"
    out = logits_ith(ctx, -1)
    del arr
    return out


def decode_batch_init(ctx: object, tokens: list[int], *, pos0: int, seq_id: int) -> np.ndarray:
    """Decode with an explicit llama_batch_init batch; logits only for the last token."""
    n = len(tokens)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = i == n - 1
        rc = llama_cpp.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"
        return logits_ith(ctx, n - 1)
    finally:
        llama_cpp.llama_batch_free(batch)


# ---------------------------------------------------------------- file generation


def test_deterministic_small_and_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    a = write_tiny_model(tmp_path / "a.gguf", seed=7)
    elapsed = time.perf_counter() - t0
    b = write_tiny_model(tmp_path / "b.gguf", seed=7)
    c = write_tiny_model(tmp_path / "c.gguf", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert a.stat().st_size < 1_000_000
    assert elapsed < 2.0  # typically ~10 ms; generous bound for slow CI machines


def test_rejects_bad_n_embd(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_tiny_model(tmp_path / "bad.gguf", n_embd=60)


def test_other_sizes_load(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "big.gguf", n_layer=3, n_embd=128, name="")
    model = _load_model(path)
    try:
        assert llama_cpp.llama_model_n_embd(model) == 128
        assert llama_cpp.llama_model_n_ctx_train(model) == 4096
        assert llama_cpp.llama_model_chat_template(model, None) is None
    finally:
        llama_cpp.llama_model_free(model)


# ---------------------------------------------------------------- metadata & vocab


def test_metadata(loaded: Loaded) -> None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(loaded.model, b"general.name", buf, len(buf))
    assert n > 0 and buf.value == b"tiny-test"
    n = llama_cpp.llama_model_meta_val_str(loaded.model, b"general.architecture", buf, len(buf))
    assert buf.value == b"llama"
    assert llama_cpp.llama_model_meta_val_str(loaded.model, b"no.such.key", buf, len(buf)) < 0
    assert llama_cpp.llama_model_chat_template(loaded.model, None) == CHAT_TEMPLATE.encode()
    assert llama_cpp.llama_model_n_ctx_train(loaded.model) == N_CTX_TRAIN
    assert llama_cpp.llama_model_n_embd(loaded.model) == 64
    assert 0 < llama_cpp.llama_model_size(loaded.model) < 1_000_000
    # the server's unified KV cache: both slots share all 2 * N_CTX cells, and any one sequence
    # may use them all (a split cache would give each sequence its own N_CTX)
    assert llama_cpp.llama_n_ctx(loaded.ctx) == 2 * N_CTX
    assert llama_cpp.llama_n_ctx_seq(loaded.ctx) == 2 * N_CTX


def test_vocab(loaded: Loaded) -> None:
    v = loaded.vocab
    assert llama_cpp.llama_vocab_n_tokens(v) == N_VOCAB
    assert llama_cpp.llama_vocab_bos(v) == BOS_ID
    assert llama_cpp.llama_vocab_eos(v) == EOS_ID
    assert llama_cpp.llama_vocab_eot(v) == END_OF_TURN_ID
    assert llama_cpp.llama_vocab_get_add_bos(v)
    assert llama_cpp.llama_vocab_is_eog(v, EOS_ID)
    assert llama_cpp.llama_vocab_is_eog(v, END_OF_TURN_ID)
    assert not llama_cpp.llama_vocab_is_eog(v, START_OF_TURN_ID)
    assert not llama_cpp.llama_vocab_is_eog(v, TOKEN_TO_ID[SPACE + "hello"])
    for tok in (BOS_ID, EOS_ID, START_OF_TURN_ID, END_OF_TURN_ID):
        assert llama_cpp.llama_vocab_is_control(v, tok)
    assert llama_cpp.llama_vocab_get_text(v, START_OF_TURN_ID) == START_OF_TURN.encode()


# ---------------------------------------------------------------- tokenizer


def test_tokenize_hello_world(loaded: Loaded) -> None:
    hello, world = TOKEN_TO_ID[SPACE + "hello"], TOKEN_TO_ID[SPACE + "world"]
    toks = tokenize(loaded.vocab, "hello world", add_special=True, parse_special=False)
    assert toks == [BOS_ID, hello, world]
    toks = tokenize(loaded.vocab, "hello world", add_special=False, parse_special=False)
    assert toks == [hello, world]
    assert token_to_piece(loaded.vocab, hello) == b" hello"
    assert token_to_piece(loaded.vocab, world) == b" world"


def test_byte_fallback(loaded: Loaded) -> None:
    toks = tokenize(loaded.vocab, "€", add_special=False, parse_special=False)
    euro = [byte_token_id(b) for b in "€".encode()]  # E2 82 AC
    assert len(euro) == 3
    assert toks[-3:] == euro
    assert toks[:-3] in ([], [TOKEN_TO_ID[SPACE]])  # optional SentencePiece space prefix
    pieces = b"".join(token_to_piece(loaded.vocab, t) for t in toks)
    assert pieces.strip() == "€".encode()


def test_special_token_parsing(loaded: Loaded) -> None:
    text = f"{START_OF_TURN}user\nhi{END_OF_TURN}"
    toks = tokenize(loaded.vocab, text, add_special=False, parse_special=True)
    assert toks[0] == START_OF_TURN_ID
    assert toks[-1] == END_OF_TURN_ID
    assert toks.count(START_OF_TURN_ID) == 1

    only = tokenize(loaded.vocab, START_OF_TURN, add_special=False, parse_special=True)
    assert only == [START_OF_TURN_ID]

    plain = tokenize(loaded.vocab, START_OF_TURN, add_special=False, parse_special=False)
    assert len(plain) > 1
    assert START_OF_TURN_ID not in plain
    assert not any(llama_cpp.llama_vocab_is_control(loaded.vocab, t) for t in plain)
    assert token_to_piece(loaded.vocab, START_OF_TURN_ID, special=True) == START_OF_TURN.encode()
    assert token_to_piece(loaded.vocab, START_OF_TURN_ID, special=False) == b""


# ---------------------------------------------------------------- decoding


def test_decode_and_greedy(loaded: Loaded) -> None:
    clear_memory(loaded.ctx)
    prompt = tokenize(loaded.vocab, "hello world", add_special=True, parse_special=False)
    logits = decode_get_one(loaded.ctx, prompt)
    assert np.all(np.isfinite(logits))
    assert float(logits.std()) > 0.1  # not degenerate
    first = int(np.argmax(logits))
    assert 0 <= first < N_VOCAB

    # a few greedy steps, one token at a time
    generated = [first]
    for _ in range(4):
        logits = decode_get_one(loaded.ctx, [generated[-1]])
        generated.append(int(np.argmax(logits)))
    mem = llama_cpp.llama_get_memory(loaded.ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == len(prompt) + 4 - 1

    # deterministic: same prompt after clearing memory gives the same logits
    clear_memory(loaded.ctx)
    again = decode_get_one(loaded.ctx, prompt)
    assert int(np.argmax(again)) == first


def test_batch_init_matches_get_one(loaded: Loaded) -> None:
    prompt = tokenize(loaded.vocab, "the cat is red", add_special=True, parse_special=False)
    clear_memory(loaded.ctx)
    ref = decode_get_one(loaded.ctx, prompt)

    clear_memory(loaded.ctx)
    got = decode_batch_init(loaded.ctx, prompt, pos0=0, seq_id=1)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)

    # continue sequence 1 after a copy to sequence 0 / partial removal
    mem = llama_cpp.llama_get_memory(loaded.ctx)
    llama_cpp.llama_memory_seq_cp(mem, 1, 0, -1, -1)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == len(prompt) - 1
    assert llama_cpp.llama_memory_seq_rm(mem, 1, -1, -1)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 1) == -1
    clear_memory(loaded.ctx)


def test_decoding_on_after_a_shared_prefix_is_a_fresh_decode(loaded: Loaded) -> None:
    """The server reuses a cached prompt by sharing one sequence's cells with another (nothing
    recomputed, and the first may then let go of them): decoding on must not tell the difference."""
    prompt = tokenize(loaded.vocab, "the cat is red", add_special=True, parse_special=False)
    more = TOKEN_TO_ID[SPACE + "dog"]
    # only a unified cache shares part of a sequence; a split one makes llama.cpp abort
    assert llama_cpp.llama_n_ctx_seq(loaded.ctx) == llama_cpp.llama_n_ctx(loaded.ctx)
    clear_memory(loaded.ctx)
    fresh = decode_get_one(loaded.ctx, [*prompt, more])

    clear_memory(loaded.ctx)
    decode_batch_init(loaded.ctx, prompt, pos0=0, seq_id=1)
    mem = llama_cpp.llama_get_memory(loaded.ctx)
    llama_cpp.llama_memory_seq_cp(mem, 1, 0, 0, len(prompt))
    assert llama_cpp.llama_memory_seq_rm(mem, 1, -1, -1)
    shared = decode_batch_init(loaded.ctx, [more], pos0=len(prompt), seq_id=0)
    np.testing.assert_allclose(shared, fresh, rtol=1e-3, atol=1e-3)
    clear_memory(loaded.ctx)


def test_sampler_chain(loaded: Loaded) -> None:
    clear_memory(loaded.ctx)
    prompt = tokenize(loaded.vocab, "hello", add_special=True, parse_special=False)
    logits = decode_get_one(loaded.ctx, prompt)

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    try:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        tok = llama_cpp.llama_sampler_sample(chain, loaded.ctx, -1)
        assert tok == int(np.argmax(logits))  # llama_sampler_sample also accepts `tok`
    finally:
        llama_cpp.llama_sampler_free(chain)  # frees the samplers added to it too
    clear_memory(loaded.ctx)
