"""`multiserve compare` on hand-made results files: % changes, and green/red by metric direction."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from multiserve.bench.compare import compare, judge, load, render
from multiserve.bench.metrics import LATENCIES, STATS
from multiserve.bench.schema import validate
from multiserve.cli import main

GREEN, RED = "\x1b[32m", "\x1b[31m"


def point(concurrency: int = 4, **metrics: float) -> dict:
    summary = {
        "completed": 10, "failed": 0, "cancelled": 0, "duration": 10.0,
        "total_input_tokens": 1000, "total_output_tokens": 1000,
        "request_throughput": 1.0, "request_goodput": None, "good_completed": None,
        "output_throughput": 100.0, "total_token_throughput": 200.0,
        **{f"{s}_{m}_ms": 50.0 for m in LATENCIES for s in STATS},
        "output_token_source": "usage", "output_token_sources": {"usage": 10},
        "input_token_source": "usage", "errors": {}, "error_statuses": {},
        "refusals": 0, "retry_wait_s": 0.0,
    }  # fmt: skip
    summary.update(metrics)
    return {
        "concurrency": concurrency,
        "rate": None,
        "burstiness": 1.0,
        "ended_by": "requests",
        "stopped_early": None,
        "delayed_arrivals": 0,
        "peak_inflight": concurrency,
        **summary,
        "records": [],
    }


def results(*points: dict, sweep: str | None = None) -> dict:
    data = {
        "tool": "multiserve bench",
        "version": "0.1.0",
        "schema_version": 1,
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:01:00+00:00",
        "server": {"url": "http://127.0.0.1:8082", "model": "m"},
        "config": {
            "url": "http://127.0.0.1:8082",
            "model": "m",
            "endpoint": "chat",
            "api_key_set": False,
            "requests": 10,
            "duration": 300.0,
            "output_tokens": 100,
        },
        "precheck": None,
        "cold_start": None,
        "warmup": {"requests": 0, "completed": 0, "records": []},
        "stopped_early": None,
        "sweep": None
        if sweep is None
        else {"parameter": sweep, "values": [p["concurrency"] for p in points]},
        "points": list(points),
    }
    validate(data)
    return data


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


A = results(point(output_throughput=100.0, mean_ttft_ms=200.0, completed=10, failed=0))
B = results(point(output_throughput=125.0, mean_ttft_ms=150.0, completed=8, failed=2))


def cells(data: list[dict]) -> dict:
    sections, _ = compare(data)
    return {row.metric: row.cells[1] for row in sections[0].rows}


def test_changes_and_directions() -> None:
    got = cells([A, B])
    assert got["output_throughput"].change_pct == pytest.approx(25.0)
    assert got["output_throughput"].verdict == "better"  # higher is better
    assert got["mean_ttft_ms"].change_pct == pytest.approx(-25.0)
    assert got["mean_ttft_ms"].verdict == "better"  # lower is better
    assert (got["completed"].change_pct, got["completed"].verdict) == (-20.0, "worse")
    assert got["failed"].verdict == "worse" and got["failed"].change_pct is None  # from zero
    assert got["p99_e2el_ms"].verdict == "same" and got["p99_e2el_ms"].change_pct == 0.0
    assert got["duration"].verdict == "neutral"
    reverse = cells([B, A])
    assert reverse["output_throughput"].change_pct == pytest.approx(-20.0)
    assert reverse["output_throughput"].verdict == "worse"
    assert reverse["mean_ttft_ms"].verdict == "worse"
    assert judge(None, 1.0, "lower").verdict == "n/a"


def test_rendering_colours_by_direction() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system="standard", width=200)
    sections, note = compare([A, B])
    render(sections, ["a", "b"], [A, B], note, console)
    lines = {line.split()[1]: line for line in buffer.getvalue().splitlines() if "│" in line}
    assert f"{GREEN}+25.0%" in lines["output_throughput"]
    assert f"{GREEN}-25.0%" in lines["mean_ttft_ms"]
    assert f"{RED}-20.0%" in lines["completed"]


def test_cli_prints_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = write(tmp_path / "a.json", A), write(tmp_path / "b.json", B)
    plot = tmp_path / "cmp.png"
    assert main(["compare", str(a), str(b), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "output_throughput" in x)
    assert "100" in line and "125" in line and "+25.0%" in line
    assert plot.stat().st_size > 1000


def test_sweeps_compare_common_points() -> None:
    first = results(point(1), point(2, output_throughput=50.0), point(4), sweep="concurrency")
    second = results(point(2, output_throughput=60.0), point(4), point(8), sweep="concurrency")
    sections, note = compare([first, second])
    assert [s.title for s in sections] == ["concurrency 2", "concurrency 4"]
    assert "2 common point" in note
    row = next(r for r in sections[0].rows if r.metric == "output_throughput")
    assert row.cells[1].change_pct == pytest.approx(20.0)
    single = results(point(8))
    sections, note = compare([first, single])  # not both sweeps: first points
    assert len(sections) == 1 and "concurrency 1 / concurrency 8" in sections[0].title


def test_bad_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"points": 3}')
    assert main(["compare", str(tmp_path / "x.json"), str(tmp_path / "missing.json")]) == 2
    empty = results()
    with pytest.raises(ValueError, match="no measured load point"):
        load(write(tmp_path / "empty.json", empty))
