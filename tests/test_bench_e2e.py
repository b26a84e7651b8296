"""`multiserve bench` as a subprocess against a real multiserve server with the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from multiserve.bench.schema import validate


def test_bench_against_the_real_server(server, tmp_path: Path) -> None:
    out, plots = tmp_path / "f.json", tmp_path / "plots"
    command = [
        sys.executable, "-m", "multiserve", "bench",
        "--url", server.url, "--model", "tiny",
        "--requests", "12", "--concurrency", "4", "--output-tokens", "8", "--ignore-eos",
        "--input-tokens", "16",  # the tiny vocabulary spells most words letter by letter
        "--out", str(out), "--plot", str(plots),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    validate(data)
    assert data["completed"] == 12 and data["failed"] == 0
    assert data["warmup"]["requests"] == 1  # the default warmup, not among the 12
    assert data["cold_start"]["success"]
    assert data["total_output_tokens"] == 12 * 8
    assert data["output_token_source"] == "usage"
    assert data["input_token_source"] == "usage"
    assert data["points"][0]["peak_inflight"] <= 4
    assert data["mean_tpot_ms"] > 0 and data["p99_ttft_ms"] >= data["median_ttft_ms"]
    assert all(len(r["itl_ms"]) >= 1 for r in data["points"][0]["records"])
    assert "Successful requests" in done.stdout
    assert (plots / "latency.png").stat().st_size > 1000
    assert f"results written to {out}\n" in done.stderr
    assert f"plot written to {plots / 'latency.png'}\n" in done.stderr


def test_quiet_bench_prints_only_a_short_summary(server, tmp_path: Path) -> None:
    out = tmp_path / "quiet.json"
    command = [
        sys.executable, "-m", "multiserve", "bench", "--quiet",
        "--url", server.url, "--model", "tiny",
        "--requests", "3", "--output-tokens", "4", "--ignore-eos", "--input-tokens", "8",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""
    summary, where = done.stderr.splitlines()  # one line for the load point, one for the file
    assert summary.startswith("multiserve bench: concurrency 1: 3 ok, 0 failed, ")
    assert "output tok/s, median TTFT " in summary and "- ms" not in summary
    assert where == f"multiserve bench: results written to {out}"
    assert out.exists()
