"""`multiserve compare A.json B.json [...]`: metrics side by side, % change against the first file.

Every change is judged by the metric's direction: throughput and goodput are better higher,
latencies, failures and refusals better lower (green = better, red = worse than the first
file); totals and duration are shown uncoloured, since they follow from the run's bounds.

Which points are compared: a single run has one point. When every file is a sweep over the
same parameter, each value present in all files is compared (in the first file's order); in
any other case (single runs, sweeps over different parameters or with no common value) the
first point of each file is compared, and the output says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from multiserve.bench.metrics import LATENCIES

Direction = Literal["higher", "lower", "neutral"]
Verdict = Literal["better", "worse", "same", "neutral", "n/a"]

METRICS: tuple[tuple[str, Direction], ...] = (
    ("completed", "higher"),
    ("failed", "lower"),
    ("duration", "neutral"),
    ("total_input_tokens", "neutral"),
    ("total_output_tokens", "neutral"),
    ("request_throughput", "higher"),
    ("request_goodput", "higher"),
    ("output_throughput", "higher"),
    ("total_token_throughput", "higher"),
    *(
        (f"{stat}_{metric}_ms", "lower")
        for metric in LATENCIES
        for stat in ("mean", "median", "std", "p90", "p95", "p99", "max")
    ),
    ("refusals", "lower"),
)


class CompareError(ValueError):
    """A file that cannot be compared (unreadable, not a results file, no measured point)."""


@dataclass(frozen=True)
class Cell:
    value: float | None
    change_pct: float | None  # vs the first file; None for the first file or a zero base
    verdict: Verdict


@dataclass(frozen=True)
class Row:
    metric: str
    direction: Direction
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Section:
    """One compared load point (e.g. `concurrency 4`) across all files."""

    title: str
    rows: tuple[Row, ...]


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CompareError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CompareError(f"{path}: not JSON ({exc})") from None
    try:
        from multiserve.bench.schema import validate

        validate(data)
    except ImportError:  # jsonschema is a test dependency; without it, check the essentials
        if not isinstance(data, dict) or not isinstance(data.get("points"), list):
            raise CompareError(f"{path}: not a multiserve bench results file") from None
    except Exception as exc:  # jsonschema.ValidationError
        message = getattr(exc, "message", str(exc))
        raise CompareError(f"{path}: not a multiserve bench results file ({message})") from None
    if not data["points"]:
        raise CompareError(
            f"{path}: no measured load point (stopped early: {data.get('stopped_early')})"
        )
    return data


def judge(base: float | None, value: float | None, direction: Direction) -> Cell:
    """The change of `value` against `base` and whether it is an improvement."""
    if value is None or base is None:
        return Cell(value, None, "n/a")
    change: float | None = 0.0 if value == base else None  # no % change from zero
    if base != 0:
        change = (value - base) / abs(base) * 100
    if direction == "neutral":
        verdict: Verdict = "neutral"
    elif value == base:
        verdict = "same"
    else:
        better = value > base if direction == "higher" else value < base
        verdict = "better" if better else "worse"
    return Cell(value, change, verdict)


def _point_key(point: dict[str, Any], parameter: str) -> Any:
    return point["concurrency"] if parameter == "concurrency" else point["rate"]


def _describe(point: dict[str, Any]) -> str:
    if point["rate"] is None:
        return f"concurrency {point['concurrency']}"
    cap = f", concurrency ≤ {point['concurrency']}" if point["concurrency"] else ""
    return f"rate {point['rate']} req/s{cap}"


def select_points(results: list[dict[str, Any]]) -> tuple[list[tuple[str, list[dict]]], str]:
    """[(title, one point per file)] and a note saying how they were chosen."""
    sweeps = [r.get("sweep") for r in results]
    parameters = {s["parameter"] for s in sweeps if s}
    if all(sweeps) and len(parameters) == 1:
        parameter = parameters.pop()
        by_key = [{_point_key(p, parameter): p for p in r["points"]} for r in results]
        common = [k for k in by_key[0] if all(k in keyed for keyed in by_key[1:])]
        if common:
            note = f"sweep over {parameter}: comparing the {len(common)} common point(s)"
            return [(_describe(by_key[0][k]), [keyed[k] for keyed in by_key]) for k in common], note
    firsts = [r["points"][0] for r in results]
    titles = [_describe(p) for p in firsts]
    if len(set(titles)) == 1:
        title = titles[0]
    else:
        title = f"first point of each file ({' / '.join(titles)})"
    note = ""
    if any(sweeps):
        note = "not all files sweep the same parameter at common values: comparing first points"
    return [(title, firsts)], note


CONDITIONS = ("model", "endpoint", "input_tokens", "output_tokens", "prompts_file_lines",
              "ignore_eos", "temperature", "requests", "warmup", "slo")  # fmt: skip


def differing_conditions(results: list[dict[str, Any]]) -> list[str]:
    """Run conditions that differ between the files: their numbers may not be comparable."""
    configs = [r.get("config", {}) for r in results]
    return [k for k in CONDITIONS if len({json.dumps(c.get(k)) for c in configs}) > 1]


def compare(results: list[dict[str, Any]]) -> tuple[list[Section], str]:
    sections = []
    selected, note = select_points(results)
    for title, points in selected:
        rows = []
        for metric, direction in METRICS:
            values = [p.get(metric) for p in points]
            if all(v is None for v in values):
                continue
            base = values[0]
            cells = [Cell(base, None, "n/a")]
            cells += [judge(base, v, direction) for v in values[1:]]
            rows.append(Row(metric, direction, tuple(cells)))
        sections.append(Section(title, tuple(rows)))
    return sections, note


STYLE = {"better": "green", "worse": "red", "same": "", "neutral": "", "n/a": "dim"}
ARROW = {"higher": " ↑", "lower": " ↓", "neutral": ""}


def _value(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def format_change(cell: Cell) -> str:
    if cell.value is None:
        return "-"
    if cell.change_pct is None:
        return "n/a"
    return f"{cell.change_pct:+.1f}%"


def _labels(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def render(
    sections: list[Section],
    labels: list[str],
    results: list[dict[str, Any]],
    note: str,
    console: Console,
) -> None:
    for label, result in zip(labels, results, strict=True):
        cfg = result.get("config", {})
        line = (
            f"[bold]{label}[/]: {result['server']['model']} @ {result['server']['url']}, "
            f"output tokens {cfg.get('output_tokens')}, started {result['started_at']}"
        )
        if result.get("stopped_early"):
            line += f" [red](stopped early: {result['stopped_early']})[/]"
        console.print(line)
    if note:
        console.print(f"[dim]{note}[/]")
    if differing := differing_conditions(results):
        console.print(f"[yellow]warning: the runs differ in {', '.join(differing)}[/]")
    for section in sections:
        table = Table(title=section.title, title_justify="left")
        table.add_column("metric (↑ higher / ↓ lower is better)")
        table.add_column(labels[0], justify="right")
        for label in labels[1:]:
            table.add_column(label, justify="right")
            table.add_column(f"Δ {label}", justify="right")
        for row in section.rows:
            cells = [_value(row.cells[0].value)]
            for cell in row.cells[1:]:
                style = STYLE[cell.verdict]
                change = format_change(cell)
                cells += [_value(cell.value), f"[{style}]{change}[/]" if style else change]
            table.add_row(row.metric + ARROW[row.direction], *cells)
        console.print(table)


PLOT_METRICS = (
    "request_throughput",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "median_itl_ms",
    "median_e2el_ms",
    "p99_e2el_ms",
)


def plot(sections: list[Section], labels: list[str], path: Path) -> None:
    """Grouped bars: each key metric of the first section as % of the first file's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {row.metric: row for row in sections[0].rows if row.metric in PLOT_METRICS}
    metrics = [m for m in PLOT_METRICS if m in rows]
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(metrics)), 4.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        heights = []
        for metric in metrics:
            base, cell = rows[metric].cells[0].value, rows[metric].cells[i].value
            ok = base not in (None, 0) and cell is not None
            heights.append(100.0 * cell / base if ok else math.nan)
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, heights, width, label=label)
    ax.axhline(100, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(
        [m + ARROW[rows[m].direction] for m in metrics], rotation=30, ha="right", fontsize=8
    )
    ax.set_ylabel(f"% of {labels[0]}")
    ax.set_title(f"{sections[0].title} (↑ higher / ↓ lower is better)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(paths: list[Path], plot_file: Path | None, console: Console, err: Console) -> int:
    """The `compare` command; returns the exit status."""
    try:
        results = [load(p) for p in paths]
    except CompareError as exc:
        err.print(f"[red]multiserve compare: {exc}[/]", highlight=False)
        return 2
    labels = _labels(paths)
    sections, note = compare(results)
    render(sections, labels, results, note, console)
    if plot_file is not None:
        plot(sections, labels, plot_file)
        err.print(f"plot written to {plot_file}")
    return 0
