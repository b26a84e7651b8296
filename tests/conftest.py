"""Shared fixtures: tiny generated GGUF models and a real multiserve server on loopback."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import is_hypothesis_test, settings
from openai import OpenAI

from tiny_gguf import write_tiny_model

SERVER_START_TIMEOUT = 60.0

# Hypothesis, and schemathesis on top of it: a failure prints the @reproduce_failure blob that
# replays it, and failing examples are kept in .hypothesis/ (out of git) to be tried first next
# run. Under CI, Hypothesis's own "ci" profile is the parent: derandomized, no database.
settings.register_profile("multiserve", print_blob=True)
settings.load_profile("multiserve")

# One seed for all fuzz tests of a run (tests/test_fuzz_requests.py, tests/test_openapi_fuzz.py),
# shown in the header and beside each failure: MULTISERVE_FUZZ_SEED=<it> draws the same cases
# again. A derandomized profile gets a fixed one.
FUZZ_SEED = int(
    os.environ.get("MULTISERVE_FUZZ_SEED")
    or (0 if settings.default.derandomize else random.SystemRandom().randrange(2**32))
)
FUZZ_RERUN = f"MULTISERVE_FUZZ_SEED={FUZZ_SEED} draws this run's fuzz cases again"


def pytest_report_header() -> str:
    return f"fuzz seed: {FUZZ_SEED} ({FUZZ_RERUN})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed fuzz test says which seed reproduces it."""
    report = yield
    if report.failed and is_hypothesis_test(getattr(item, "obj", None)):
        report.sections.append(("fuzz seed", FUZZ_RERUN))
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log: Path

    @property
    def openai(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_server(
    args: list[str], workdir: Path, ready_path: str = "/health"
) -> Iterator[RunningServer]:
    """Start `multiserve serve` as a subprocess on a free loopback port; stop it afterwards."""
    port = free_port()
    log = workdir / f"server-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "multiserve", "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{server.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{server.output()}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


BACKENDS = ("local", "ray")  # end-to-end modules that run on both: params of their server


@contextlib.contextmanager
def serving_on(backend: str, config: Path) -> Iterator[RunningServer]:
    """`multiserve serve --config config`, locally or on a fresh two-node simulated Ray cluster
    (both nodes with 1 GiB for models and two CPUs)."""
    if backend == "local":
        with run_server(["--config", str(config)], config.parent) as running:
            yield running
        return
    from multiserve.backends.ray_local import local_cluster

    with (
        local_cluster([2**30, 2**30]) as (cluster, _),
        run_server(["--config", str(config), "--ray", cluster.address], config.parent) as running,
    ):
        yield running


def on_each_backend(
    request: pytest.FixtureRequest, shared: RunningServer
) -> Iterator[RunningServer]:
    """For a module's `server` fixture with params BACKENDS: the session's local server, or the
    same config served on a Ray cluster."""
    if request.param == "local":
        yield shared
        return
    with serving_on(request.param, shared.log.parent / "multiserve.toml") as running:
        yield running


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir: Path) -> Path:
    return write_tiny_model(model_dir / "tiny.gguf", seed=0, n_ctx_train=8192)


TINY_CONFIG = """
threads = 1

[[models]]
id = "tiny"
aliases = ["tiny-alias"]
path = "tiny.gguf"
n_ctx = 256
n_parallel = 16
step_tokens = 64
threads = 1

[[models]]
id = "tiny-q8"
path = "tiny-wide.gguf"
n_ctx = 256
n_parallel = 4
step_tokens = 64
kv_cache_type = "q8_0"
threads = 1

[[models]]
id = "tiny-2slots"
path = "tiny.gguf"
n_ctx = 8192
n_parallel = 2
step_tokens = 64
threads = 1
"""


@pytest.fixture(scope="session")
def wide_tiny_model(model_dir: Path) -> Path:
    """Heads 32 wide: llama.cpp's quantized KV blocks are 32 elements."""
    return write_tiny_model(model_dir / "tiny-wide.gguf", seed=1, n_embd=128)


@pytest.fixture(scope="session")
def server(tiny_model: Path, wide_tiny_model: Path, model_dir: Path) -> Iterator[RunningServer]:
    """One server for the read-mostly end-to-end tests, serving two tiny models."""
    config = model_dir / "multiserve.toml"
    config.write_text(TINY_CONFIG)
    with run_server(["--config", str(config)], model_dir) as running:
        yield running
