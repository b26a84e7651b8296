"""A second, different model for benchmarks that need two: the embedded model requantized.

Nothing can be downloaded here, and two ids on one file share their weights' pages and their
kernels, which flatters core sharing. Requantizing the embedded Gemma 3 270M Q4_K_M to Q8_0 with
llama.cpp's own quantizer gives a genuinely different file: its layers' weights twice the bytes,
other matrix kernels, another decode speed. Made once in a fresh process and cached by the source
file's size and modification time.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.common.llama_anchor import import_llama, in_fresh_process
from multiserve.models.default import default_model_path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "multiserve" / "bench"


def _quantize(source: str, target: str, threads: int) -> None:
    """llama.cpp's quantizer, Q8_0 from an already quantized file (`allow_requantize`)."""
    ll = import_llama()
    params = ll.llama_model_quantize_default_params()
    params.ftype = ll.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = threads
    if ll.llama_model_quantize(source.encode(), target.encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not requantize {source}")


def q8_model(threads: int) -> Path:
    """The embedded model as Q8_0, made on first use (a few seconds)."""
    source = default_model_path(show_progress=False)
    stat = source.stat()
    target = CACHE / f"{source.stem}-q8_0-{stat.st_size}-{int(stat.st_mtime)}.gguf"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        in_fresh_process(_quantize, str(source), str(partial), threads)
        partial.rename(target)
    return target
