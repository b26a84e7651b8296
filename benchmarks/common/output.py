"""Where a benchmark writes: progress and errors to stderr, the report to stdout.

Keeping the two apart lets `> report.txt` capture the tables alone while the progress stays on
the terminal.
"""

from __future__ import annotations

import sys

from rich.console import Console

WIDTH = None if sys.stdout.isatty() else 120  # rich would wrap piped output at 80 columns

console = Console(stderr=True, width=WIDTH)  # progress, warnings, errors
out = Console(width=WIDTH)  # the report
