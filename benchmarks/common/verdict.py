"""Targets judged the same way in every benchmark: PASS/MISS cells, and exit status 1 on a miss.

Every benchmark exits 1 when it missed a target, so `make bench` fails; `--no-fail` is for
exploring.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.table import Table

from benchmarks.common.noise import NOISY_MARK
from benchmarks.common.output import console

UNEQUAL = "[yellow]NOT COUNTED (unequal work)"


def add_no_fail(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-fail", action="store_true", help="exit 0 even when a target is missed"
    )


def exit_status(missed: Sequence[str], no_fail: bool) -> int:
    """1 when a target was missed (said on stderr), unless --no-fail."""
    if not missed:
        return 0
    note = " (--no-fail: exit status 0)" if no_fail else ""
    console.print(f"[red]missed the target: {', '.join(missed)}{note}")
    return 0 if no_fail else 1


def verdict(ok: bool | None, noisy: bool = False, miss: str = "MISS") -> str:
    """A result cell (rich markup): PASS or `miss`, marked when the machine was busy; None, a
    comparison that a side won only by doing less work (see equal_work.judged), is no verdict."""
    if ok is None:
        return UNEQUAL
    word = "[green]PASS" if ok else f"[red]{miss}"
    return word + (NOISY_MARK if noisy else "")


def target_table(title: str) -> Table:
    """The measurement / median / runs / target / result table of the ratio benchmarks."""
    table = Table(title=title)
    for column in ("measurement", "median", "runs", "target", "result"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    return table


def runs_text(values: Sequence[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    """Every run's value, so a median's spread shows beside it."""
    return "  ".join(fmt.format(v * scale) for v in values)
