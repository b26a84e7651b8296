"""Schemathesis against the server's own OpenAPI document: no 5xx, only documented statuses,
content types and bodies, invalid data refused, missing keys refused; the server serves on."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.core.parameters import ParameterLocation

from conftest import FUZZ_SEED, RunningServer, run_server
from multiserve.api.app import create_app
from multiserve.config import Settings

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVED = ["fuzz", "fuzz-b"]
EMBEDDING = "fuzz-embed"


@pytest.fixture(scope="module")
def fuzz_server(tiny_model: Path, model_dir: Path) -> Iterator[RunningServer]:
    config = model_dir / "fuzz.toml"
    models = "".join(
        f'[[models]]\nid = "{name}"\npath = "tiny.gguf"\nn_ctx = 256\nn_parallel = 4\n'
        for name in SERVED
    )
    models += f'[[models]]\nid = "{EMBEDDING}"\npath = "tiny.gguf"\nembedding = true\n'
    config.write_text(f'threads = 1\napi_keys = ["{KEY}"]\n{models}')
    with run_server(["--config", str(config)], model_dir) as server:
        yield server


def _published_document() -> dict:
    return create_app(Settings(api_keys=[KEY])).openapi()


def _fuzzing_schema():
    document = copy.deepcopy(_published_document())
    # Aim most cases at served models (plus one unknown name), so generation runs, not just 404s.
    names = {"enum": [*SERVED, "no-such-model"]}
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        document["components"]["schemas"][request]["properties"]["model"] = names
    embedders = {"enum": [EMBEDDING, SERVED[0], "no-such-model"]}  # and a chat model: 400
    document["components"]["schemas"]["EmbeddingRequest"]["properties"]["model"] = embedders
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model_id":
                    parameter["schema"] = names
    return schemathesis.openapi.from_dict(document)


schema = _fuzzing_schema()
schema.config.seed = FUZZ_SEED  # each operation draws from a seed derived from it


def test_served_document_is_the_one_fuzzed(fuzz_server: RunningServer) -> None:
    served = httpx.get(f"{fuzz_server.url}/openapi.json", headers=AUTH).raise_for_status().json()
    assert served == _published_document()


# Refusals a schema cannot foresee: they depend on the model (context, slots, vocabulary, grammar).
RUNTIME_REFUSALS = {
    "context_length_exceeded",
    "n_too_large",
    "too_many_prompts",
    "token_out_of_vocabulary",
    "empty_prompt",
    "unsupported_schema",
    "wrong_model_type",
    "dimensions_too_large",
    "images_not_supported",
    # and what JSON Schema cannot say: names unique within a list, or one of another list's
    "duplicate_tool_name",
    "unknown_tool",
}


def schema_valid_data_is_served(ctx, response, case) -> None:
    """Stricter stand-in for `positive_data_acceptance`: a schema-valid request is answered, or
    refused with 400 only for a reason that depends on the model, named by its error code."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    if response.status_code == 400:
        code = response.json()["error"]["code"]
        assert code in RUNTIME_REFUSALS, f"schema-valid request refused: {response.text}"


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("MULTISERVE_FUZZ_EXAMPLES", "40")),  # more for a deep run
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_matches_its_openapi_document(case, fuzz_server: RunningServer) -> None:
    # the key goes with every case except those that leave out headers on purpose
    header_mode = case.meta.components.get(ParameterLocation.HEADER) if case.meta else None
    leaves_out_headers = header_mode is not None and header_mode.mode.is_negative
    case.call_and_validate(
        base_url=fuzz_server.url,
        headers=None if leaves_out_headers else AUTH,
        timeout=60,
        excluded_checks=[checks.positive_data_acceptance],
        additional_checks=[schema_valid_data_is_served],
    )


def test_server_still_serves_after_fuzzing(fuzz_server: RunningServer) -> None:
    body = {"model": "fuzz", "prompt": "hello", "max_tokens": 3}
    response = httpx.post(f"{fuzz_server.url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1
    body = {"model": EMBEDDING, "input": ["hello", "world"]}
    response = httpx.post(f"{fuzz_server.url}/v1/embeddings", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2
