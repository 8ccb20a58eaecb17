"""Rich progress bars and summary tables shared by every long stage."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

_LOG_WIDTH = 160
"""Width of tables written to a file or pipe (a terminal's own width is used otherwise)."""

console = Console(stderr=True, width=None if sys.stderr.isatty() else _LOG_WIDTH)
"""Console for progress and logs (stderr, so stdout stays parseable)."""

stdout_console = Console(width=None if sys.stdout.isatty() else _LOG_WIDTH)
"""Console for results tables."""


def progress(*extra_columns: Any, unit: str = "") -> Progress:
    """A progress display with bar, count (``unit`` after it), rate/ETA; ``extra_columns`` come before
    the timers. ``SAELAB_PROGRESS=0`` turns progress displays off."""
    count = MofNCompleteColumn() if not unit else TextColumn(
        "{task.completed:,.0f}/{task.total:,.0f} " + unit.replace("[", r"\[")
    )
    columns: list[Any] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        count,
        TaskProgressColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, console=console, transient=False, disable=not progress_enabled())


def progress_enabled() -> bool:
    """False when ``SAELAB_PROGRESS`` is ``0``, ``false`` or ``off``."""
    return os.environ.get("SAELAB_PROGRESS", "").lower() not in ("0", "false", "off")


def summary_table(title: str, rows: Sequence[Mapping[str, Any]] | Iterable[tuple[str, Any]]) -> Table:
    """A two-column (key, value) table or a many-column table from a list of dicts."""
    table = Table(title=title, title_justify="left")
    rows = list(rows)
    if rows and isinstance(rows[0], Mapping):
        keys = list(rows[0].keys())
        for key in keys:
            table.add_column(str(key))
        for row in rows:
            table.add_row(*(format_value(row.get(k)) for k in keys))
    else:
        table.add_column("")
        table.add_column("")
        for key, value in rows:
            table.add_row(str(key), format_value(value))
    return table


def format_value(value: Any) -> str:
    """Compact rendering of numbers for tables."""
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return "" if value is None else str(value)
