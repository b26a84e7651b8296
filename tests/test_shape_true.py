"""Shape-true models (benchmarks/shapes): the five experts' plans match what their real Q4_K_M
files hold, and a generated realistic-scale model loads, decodes and serves in llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from benchmarks.shapes.gguf_file import cached_model, data_bytes
from benchmarks.shapes.specs import EXPERTS, LLAMA_1B, SHAPES, tensor_plan, use_more_bits

from conftest import run_server

MIB = 2**20

# What llama.cpp printed loading the real files (public load logs; docs/shape_true_models.md):
# tensors by type, and the model buffer in MiB.
REAL_FILES = {
    "phi4": ({"F32": 81, "Q4_K": 101, "Q5_K": 40, "Q6_K": 21}, 8630.32),
    "mistral": ({"F32": 65, "Q4_K": 193, "Q6_K": 33}, 4169.52),
    "qwen": ({"F32": 141, "Q4_K": 169, "Q6_K": 29}, 4460.45),  # Qwen2.5-Coder-7B: same shapes
}


@pytest.mark.parametrize("name", REAL_FILES)
def test_plans_hold_the_real_files_tensor_types_and_bytes(name: str) -> None:
    types, buffer_mib = REAL_FILES[name]
    plan = tensor_plan(SHAPES[name])
    assert Counter(t.qtype.name for t in plan) == types
    assert sum(data_bytes(t) for t in plan) / MIB == pytest.approx(buffer_mib, abs=0.015)


def test_tied_embeddings_plans_have_their_real_tensor_counts() -> None:
    """Gemma 3 4B's real file has 444 tensors, Aya Expanse 8B's 258; both tie the output to a
    Q6_K token embedding (the size of bartowski's Q8_0-embedding variants says so)."""
    for name, count in (("gemma3", 444), ("aya_expanse_multilingual", 258)):
        plan = tensor_plan(SHAPES[name])
        assert len(plan) == count
        assert plan[0].name == "token_embd.weight" and plan[0].qtype.name == "Q6_K"
        assert "output.weight" not in {t.name for t in plan}


@pytest.mark.parametrize("name", EXPERTS)
def test_each_expert_is_within_two_percent_of_its_real_file(name: str) -> None:
    shape = SHAPES[name]
    size = sum(data_bytes(t) for t in tensor_plan(shape))
    assert size == pytest.approx(shape.published_bytes, rel=0.02)


def test_q6_k_layers_are_llama_cpps() -> None:
    """32 layers: the first and last four, and every third between (llama-quant.cpp)."""
    chosen = [i for i in range(32) if use_more_bits(i, 32)]
    assert chosen == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.fixture(scope="module")
def realistic() -> Path:
    """Llama 3.2 1B's shapes, 0.8 GB, generated once per machine (about 4 s)."""
    return cached_model(LLAMA_1B)


def test_the_realistic_model_loads_as_its_shape_says(realistic: Path) -> None:
    """In a process of its own: llama.cpp counts the planned parameters and bytes, and a
    decode through every layer gives finite, varied logits."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.shapes.probe", str(realistic), "--tokens", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    plan = tensor_plan(LLAMA_1B)
    assert seen["params"] == sum(t.values for t in plan)
    assert seen["bytes"] == sum(data_bytes(t) for t in plan)
    assert (seen["vocab"], seen["layers"]) == (LLAMA_1B.n_vocab, LLAMA_1B.n_layer)
    assert seen["finite"] and seen["spread"] > 0
    assert realistic.stat().st_size == pytest.approx(LLAMA_1B.published_bytes, rel=0.02)


def test_the_realistic_model_serves(realistic: Path, tmp_path: Path) -> None:
    args = ["--model", str(realistic), "--ctx", "512", "--parallel", "2", "--threads", "2"]
    with run_server(args, tmp_path) as server, server.http() as http:
        body = {"model": realistic.stem, "prompt": "w1 w2 w3", "max_tokens": 8, "ignore_eos": True}
        reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8


def test_realistic_models_take_turns_within_a_budget_that_holds_one(
    realistic: Path, tmp_path: Path
) -> None:
    """Two 1B models under a budget with room for one: each request evicts the other model,
    nothing is refused, and the loaded worker's RSS stays under its estimate."""
    models = "".join(
        f'[[models]]\nid = "{name}"\npath = "{realistic}"\nn_ctx = 512\nn_parallel = 2\n'
        for name in ("a", "b")
    )
    config = tmp_path / "multiserve.toml"
    config.write_text(f'threads = 2\nmemory_budget = "1.5GiB"\n{models}')
    body = {"prompt": "w1 w2", "max_tokens": 2, "ignore_eos": True}
    with run_server(["--config", str(config)], tmp_path) as server, server.http() as http:
        for name in ("a", "b", "a"):
            reply = http.post("/v1/completions", json={"model": name, **body})
            assert reply.status_code == 200, reply.text
            stats = http.get("/stats").json()
            states = {m: s["state"] for m, s in stats["models"].items()}
            assert states == {name: "loaded", "b" if name == "a" else "a": "unloaded"}
            memory = stats["models"][name]["memory_bytes"]
            assert stats["memory"]["reserved"] == memory["estimate"]["total"] <= 1.5 * 2**30
            assert memory["rss"] < memory["estimate"]["total"]
        assert stats["models"]["a"]["loads"] == 2 and stats["models"]["b"]["loads"] == 1
