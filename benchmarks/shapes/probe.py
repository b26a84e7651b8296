"""Load a GGUF file in llama.cpp and decode with it: what llama.cpp counts, and how fast.

    .venv/bin/python -m benchmarks.shapes.probe FILE [--tokens 16] [--threads 2]

Prints one JSON object: parameters, bytes and layers as llama.cpp counts them, whether the last
logits are finite (and their spread), the load time, and the decode speed of single tokens fed
back greedily (a chat's decode loop, one sequence, no sampling cost). Run it in a process of its
own: a malformed file may crash llama.cpp, and that must not take the caller with it.
"""

from __future__ import annotations

import argparse
import json
import time

import llama_cpp as ll
import numpy as np

PROMPT = (1, 300, 4000, 9000, 20000, 30000, 31000, 32000)  # ids every model here has


def probe(path: str, tokens: int, threads: int) -> dict:
    started = time.perf_counter()
    model = ll.llama_model_load_from_file(path.encode(), ll.llama_model_default_params())
    if not model:
        raise SystemExit("llama.cpp could not load the file")
    params = ll.llama_context_default_params()
    params.n_ctx, params.n_batch = 512, 64
    params.n_threads = params.n_threads_batch = threads
    ctx = ll.llama_init_from_model(model, params)
    loaded = time.perf_counter() - started
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    prompt = (ll.llama_token * len(PROMPT))(*PROMPT)  # kept referenced while llama.cpp reads it
    assert ll.llama_decode(ctx, ll.llama_batch_get_one(prompt, len(PROMPT))) == 0
    logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
    token = (ll.llama_token * 1)()
    started = time.perf_counter()
    for _ in range(tokens):
        token[0] = int(
            np.argmax(np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), (n_vocab,)))
        )
        assert ll.llama_decode(ctx, ll.llama_batch_get_one(token, 1)) == 0
    decoding = time.perf_counter() - started
    result = {
        "params": ll.llama_model_n_params(model),
        "bytes": ll.llama_model_size(model),
        "vocab": n_vocab,
        "layers": ll.llama_model_n_layer(model),
        "finite": bool(np.isfinite(logits).all()),
        "spread": float(logits.std()),
        "load_seconds": round(loaded, 3),
        "decode_tokens_per_second": round(tokens / decoding, 3) if tokens else None,
    }
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--tokens", type=int, default=16, help="single tokens to decode, timed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(probe(args.file, args.tokens, args.threads)))


if __name__ == "__main__":
    main()
