"""Server subprocesses for the benchmarks: multiserve, llama.cpp's `llama-server` and
llama-cpp-python's server, each started on loopback, awaited, and always stopped.

One lifecycle for all of them, so that every benchmark fails the same clear way (the exit code
or the wait, and the last lines of the server's log) and none leaves a server or a worker behind
on the cores the next measurement needs.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import psutil

from benchmarks.common.output import console

HOST = "127.0.0.1"  # loopback only: nothing here is ever reachable from outside
READY_POLL_S = 0.25
STOP_TIMEOUT_S = 20.0  # for the graceful drain on SIGINT, before SIGKILL


@dataclass(frozen=True)
class ServerCommand:
    """A server to start: what it is called in reports, its command, and its readiness route."""

    name: str
    command: list[str]
    ready_path: str = "/health"


def multiserve_command(port: int, *options: str) -> list[str]:
    """`multiserve serve` on HOST:port with this interpreter; `options` add to it."""
    serve = ["serve", "--host", HOST, "--port", str(port), *options]
    return [sys.executable, "-m", "multiserve", *serve]


def llama_server_command(
    binary: str | Path, model: Path, port: int, threads: int, n_ctx: int, slots: int, *options: str
) -> list[str]:
    """llama.cpp's `llama-server`: `n_ctx` is the whole context, shared by its `slots`."""
    command = [str(binary), "-m", str(model), "--host", HOST, "--port", str(port)]
    return [*command, "-t", str(threads), "-c", str(n_ctx), "-np", str(slots), *options]


def build_llama_server() -> Path:
    """llama.cpp's `llama-server` built from the sources our llama-cpp-python vendors, with our
    CMake flags (scripts/build-llama-server.sh: several minutes once, then cached)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "build-llama-server.sh"
    done = subprocess.run(["bash", str(script)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(done.stdout.strip().splitlines()[-1])


def llama_cpp_python_command(model: Path, port: int, threads: int, n_ctx: int) -> list[str]:
    """llama-cpp-python's own server with `--interrupt_requests False`: by default it cuts off a
    stream in flight whenever a new request arrives, which no client of a shared endpoint wants.
    """
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
    command += ["--host", HOST, "--port", str(port), "--n_threads", str(threads)]
    command += ["--n_threads_batch", str(threads), "--n_ctx", str(n_ctx)]
    return [*command, "--interrupt_requests", "False"]


def port_taken(port: int) -> bool:
    """True (and said on stderr) when something already listens on HOST:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        taken = sock.connect_ex((HOST, port)) == 0
    if taken:
        console.print(f"[red]port {port} on {HOST} is already in use; pick another --port")
    return taken


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class RunningServer:
    name: str
    command: list[str]
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    ready_s: float  # from start to ready: for multiserve with `loaded`, the model load

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@contextlib.contextmanager
def serving(
    name: str,
    command: list[str],
    port: int,
    log: Path,
    *,
    ready_path: str = "/health",
    loaded: Sequence[str] = (),
    timeout_s: float = 120.0,
) -> Iterator[RunningServer]:
    """Start `command` (a server on HOST:port) in its own session, wait until `ready_path`
    answers 200 and multiserve's /health reports every model in `loaded` as loaded, and yield
    it. It is always stopped on the way out; if the body raises, the log's last lines are shown.
    """
    console.print(f"{name}: {shlex.join(command)}", markup=False, highlight=False)
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        ready_s = _wait_ready(
            name, proc, log, f"http://{HOST}:{port}{ready_path}", loaded, timeout_s
        )
        server = RunningServer(name, command, proc, log, port, ready_s)
        try:
            yield server
        except Exception:
            console.print(f"[red]{name} log, last lines:")
            console.print(log_tail(log), markup=False, highlight=False)
            raise
    finally:
        stop(proc)


def _wait_ready(
    name: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    url: str,
    loaded: Sequence[str],
    timeout_s: float,
) -> float:
    """Seconds until the server is ready; raises with the log's tail if it exits or stalls."""
    start = time.perf_counter()
    with httpx.Client(trust_env=False, timeout=2.0) as client:  # loopback: never a proxy
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode}; its log ends:\n{log_tail(log)}"
                )
            with contextlib.suppress(httpx.TransportError, ValueError):
                response = client.get(url)
                states = response.json().get("models", {}) if loaded else {}
                if response.status_code == 200 and all(states.get(m) == "loaded" for m in loaded):
                    return time.perf_counter() - start
            if time.perf_counter() - start > timeout_s:
                raise TimeoutError(
                    f"{name} not ready after {timeout_s:.0f}s; its log ends:\n{log_tail(log)}"
                )
            time.sleep(READY_POLL_S)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (every server here drains and exits on it), SIGKILL after STOP_TIMEOUT_S; then any
    child it left behind (a multiserve worker) is waited for briefly and killed."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.wait(timeout=5)
        with contextlib.suppress(psutil.Error):
            child.kill()


def run_benchmark(main: Callable[[], int]) -> NoReturn:
    """Exit with `main()`'s status. SIGTERM becomes SystemExit and Ctrl-C KeyboardInterrupt, so
    every `serving` block still stops its server (they run in their own sessions, where neither
    signal reaches them)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        console.print("[red]interrupted")
        sys.exit(130)
