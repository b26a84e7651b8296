"""The memory estimate (fleet/memory.py) against what llama.cpp really allocates and the OS sees.

The estimate decides which models fit the memory budget, so its KV part must be the KV cache
llama.cpp allocates: checked against llama.cpp's own buffer-size log for the context a worker
builds (`context_params(worker_config(spec))`), and against the RSS of real workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import time
from collections.abc import Iterator
from pathlib import Path

import llama_cpp as ll
import psutil
import pytest
from benchmarks.shapes.gguf_file import cached_model, data_bytes
from benchmarks.shapes.specs import LLAMA_1B, tensor_plan

from conftest import run_server
from multiserve.config import ModelSpec
from multiserve.engine.runtime import context_params
from multiserve.fleet.gguf_header import read_header
from multiserve.fleet.manager import worker_config
from multiserve.fleet.memory import MemoryEstimate, estimate_memory
from multiserve.models.default import default_model_path
from tiny_gguf import write_tiny_model

MIB = 2**20
# 8 layers x 2 KV heads x (64 + 64) dims: 4 KiB of f16 KV per cell, and heads 32-wide as
# llama.cpp's quantized KV blocks need
KV_MODEL = {"seed": 2, "n_layer": 8, "n_embd": 256, "n_ctx_train": 65536}

_log: list[str] | None = None  # where llama.cpp's log goes while this module's tests run


@ll.llama_log_callback
def _collect_log(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    if _log is not None:
        _log.append(text.decode("utf-8", errors="replace"))


@pytest.fixture(scope="module")
def kv_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("kv") / "kv.gguf", **KV_MODEL)


@pytest.fixture(scope="module")
def realistic_model() -> Path:
    """Llama 3.2 1B's shapes at Q4_K_M (0.8 GB, benchmarks/shapes): a model whose weights, not
    its buffers, are most of its memory, as with the experts users run."""
    return cached_model(LLAMA_1B)


def _model_for(which: str, kv_model: Path, request: pytest.FixtureRequest) -> Path:
    """The model a parametrised test names (the realistic one generated only if asked for)."""
    if which == "tiny":
        return kv_model
    if which == "realistic":
        return request.getfixturevalue("realistic_model")
    return default_model_path(show_progress=False)


@pytest.fixture(scope="module")
def llama_log() -> Iterator[list[str]]:
    """llama.cpp's log lines, collected; silent afterwards (a Runtime sets its own logger)."""
    global _log
    _log = []
    ll.llama_backend_init()
    ll.llama_log_set(_collect_log, None)
    yield _log
    _log = None


def _allocated_mib(path: Path, spec: ModelSpec, log: list[str]) -> tuple[float, float, float]:
    """(KV, compute, output) buffer MiB llama.cpp logs creating the context a worker makes for
    `spec`."""
    model = ll.llama_model_load_from_file(str(path).encode(), ll.llama_model_default_params())
    assert model, "llama.cpp could not load the model"
    log.clear()
    ctx = ll.llama_init_from_model(model, context_params(worker_config(spec, threads=1)))
    try:
        assert ctx, "llama.cpp could not create the context"
        text = "".join(log)
    finally:
        ll.llama_free(ctx)
        ll.llama_model_free(model)

    def total(what: str) -> float:  # a sliding-window model has two KV caches
        sizes = re.findall(rf"{what} buffer size =\s*([\d.]+) MiB", text)
        assert sizes, f"no '{what} buffer size' in llama.cpp's log:\n{text}"
        return sum(float(size) for size in sizes)

    return total("KV"), total("compute"), total("output")


def _estimated_and_allocated(
    path: Path, log: list[str], **shape: object
) -> tuple[MemoryEstimate, float, float, float]:
    """The estimate for a model table of `shape`, and the (KV, compute, output) MiB llama.cpp
    allocates."""
    spec = ModelSpec(id="m", path=path, **shape)
    return estimate_memory(read_header(path), spec), *_allocated_mib(path, spec, log)


@pytest.mark.parametrize(
    ("kv_cache_type", "n_ctx", "n_parallel", "flash_attn"),
    [
        ("f16", 1000, 3, True),  # 3000 cells: llama.cpp rounds up to 3072
        ("f16", 2048, 8, False),
        ("q8_0", 4096, 2, True),
        ("q4_0", 700, 1, True),
    ],
)
def test_kv_estimate_is_the_kv_cache_llama_cpp_allocates(
    kv_model: Path,
    llama_log: list[str],
    kv_cache_type: str,
    n_ctx: int,
    n_parallel: int,
    flash_attn: bool,
) -> None:
    estimate, kv, _, _ = _estimated_and_allocated(
        kv_model,
        llama_log,
        n_ctx=n_ctx,
        n_parallel=n_parallel,
        kv_cache_type=kv_cache_type,
        flash_attn=flash_attn,
        step_tokens=64,
    )
    assert estimate.kv_cache / MIB == pytest.approx(kv, abs=0.006)  # the log rounds to 0.01 MiB


@pytest.mark.parametrize("kv_cache_type", ["f16", "q8_0"])
def test_weights_and_kv_estimates_of_a_realistic_model(
    realistic_model: Path, llama_log: list[str], kv_cache_type: str
) -> None:
    """At the scale users run: the weights are the file's tensors, the KV cache llama.cpp's."""
    estimate, kv, _, _ = _estimated_and_allocated(
        realistic_model, llama_log, n_ctx=4096, n_parallel=4, kv_cache_type=kv_cache_type
    )
    assert estimate.weights == sum(data_bytes(t) for t in tensor_plan(LLAMA_1B))
    assert estimate.kv_cache / MIB == pytest.approx(kv, abs=0.006)


def test_kv_estimate_of_the_sliding_window_default_model(llama_log: list[str]) -> None:
    """Gemma 3 has sliding-window layers (a KV cache of their own): at full size by default."""
    path = default_model_path(show_progress=False)
    estimate, kv, _, _ = _estimated_and_allocated(
        path, llama_log, n_ctx=1024, n_parallel=2, step_tokens=64
    )
    assert estimate.kv_cache / MIB == pytest.approx(kv, abs=0.006)


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize(("n_ctx", "n_parallel", "step_tokens"), [(512, 2, 32), (4096, 8, 256)])
@pytest.mark.parametrize("which", ["tiny", "default", "realistic"])
def test_compute_estimate_is_within_15_percent_above_llama_cpps(
    kv_model: Path,
    request: pytest.FixtureRequest,
    llama_log: list[str],
    which: str,
    n_ctx: int,
    n_parallel: int,
    step_tokens: int,
    flash_attn: bool,
) -> None:
    """What fleet/memory.py promises: the tiny model's step is its attention scores, the
    default model's (262k vocabulary) its logits, the realistic one's (16 layers 2048 wide,
    128k vocabulary) its logits or its attention, by the shape."""
    path = _model_for(which, kv_model, request)
    estimate, _, compute, _ = _estimated_and_allocated(
        path,
        llama_log,
        n_ctx=n_ctx,
        n_parallel=n_parallel,
        step_tokens=step_tokens,
        flash_attn=flash_attn,
    )
    assert compute <= estimate.compute / MIB <= 1.15 * compute


@pytest.mark.parametrize(
    ("which", "step_tokens", "flash_attn"),
    [("default", 128, True), ("default", 256, False), ("tiny", 256, False)],
)
def test_embedding_estimate_is_its_kv_and_a_step_of_outputs(
    kv_model: Path, llama_log: list[str], which: str, step_tokens: int, flash_attn: bool
) -> None:
    """An embeddings context holds one step's cells, and every token of a step is an output:
    llama.cpp's output buffer takes a step's logits and vectors beside the compute buffer. It is
    sized for `n_parallel` outputs at creation and grows to a step's at the first decode, so
    with `n_parallel` = `step_tokens` the log shows what a full step takes."""
    path = kv_model if which == "tiny" else default_model_path(show_progress=False)
    estimate, kv, compute, output = _estimated_and_allocated(
        path,
        llama_log,
        embedding=True,
        n_ctx=64,
        n_parallel=step_tokens,
        step_tokens=step_tokens,
        flash_attn=flash_attn,
    )
    assert estimate.kv_cache / MIB == pytest.approx(kv, abs=0.006)
    allocated = compute + output
    assert allocated - 0.01 <= estimate.compute / MIB <= 1.15 * allocated  # the log rounds
    assert estimate.host_cache == 0


SMALL_KV, BIG_KV = (1024, 2), (8192, 8)  # n_ctx x n_parallel: 8 MiB and 256 MiB of KV cache


@contextlib.contextmanager
def _all_loaded(models: str, tmp_path: Path) -> Iterator[dict]:
    """A server on `models` (TOML tables, all preloaded), once every one is loaded: the models
    part of its /stats, while it still runs."""
    config = tmp_path / "multiserve.toml"
    config.write_text(f"threads = 1\n{models}")
    with run_server(["--config", str(config)], tmp_path) as server, server.http() as http:
        deadline = time.monotonic() + 60
        while True:
            stats = http.get("/stats").json()["models"]
            if all(m["state"] == "loaded" for m in stats.values()):
                break
            assert time.monotonic() < deadline, f"the models did not load: {stats}"
            time.sleep(0.2)
        yield stats


def test_worker_rss_grows_by_the_kv_estimate(kv_model: Path, tmp_path: Path) -> None:
    """Two workers of one file, one with 32x the cells: their RSS differ by the KV estimates'.

    llama.cpp clears its KV buffer when it creates the context, so the whole cache is resident
    from the load on; the difference of two workers cancels Python's and llama.cpp's own memory.
    The bigger worker's RSS also stays under its estimate's total, the budget's promise.
    """
    models = "".join(
        f'[[models]]\nid = "{name}"\npath = "{kv_model}"\nn_ctx = {n_ctx}\n'
        f'n_parallel = {n_parallel}\nstep_tokens = 64\npreload = true\nhost_cache = "0"\n'
        for name, (n_ctx, n_parallel) in (("small", SMALL_KV), ("big", BIG_KV))
    )
    with _all_loaded(models, tmp_path) as stats:
        small, big = (stats[name]["memory_bytes"] for name in ("small", "big"))
    kv_growth = big["estimate"]["kv_cache"] - small["estimate"]["kv_cache"]
    assert big["rss"] - small["rss"] == pytest.approx(kv_growth, rel=0.1)
    assert kv_growth == 248 * MIB  # (65,536 - 2,048) cells x 4 KiB
    assert big["rss"] < big["estimate"]["total"]


def test_workers_read_their_file_in_unless_told_to_map_it(kv_model: Path, tmp_path: Path) -> None:
    """Read in, llama.cpp's repacked weights are the only copy (the estimate holds, see
    docs/shape_true_models.md); `mmap = true` maps the file as before."""
    models = "".join(
        f'[[models]]\nid = "{name}"\npath = "{kv_model}"\nn_ctx = 256\nn_parallel = 1\n'
        f"step_tokens = 64\npreload = true\nmmap = {mapped}\n"
        for name, mapped in (("read", "false"), ("mapped", "true"))
    )
    with _all_loaded(models, tmp_path) as stats:
        maps = {
            name: {m.path for m in psutil.Process(stats[name]["worker_pid"]).memory_maps()}
            for name in ("read", "mapped")
        }
    assert str(kv_model) not in maps["read"]
    assert str(kv_model) in maps["mapped"]
