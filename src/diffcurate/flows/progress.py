"""The progress bar flows show on long work (only when stderr is a terminal: logs stay clean)."""

from __future__ import annotations

import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(label: str, enabled: bool, with_status: bool = False) -> Progress:
    """A ``label [bar] done/total [status] elapsed`` bar; ``with_status`` adds a text field
    updated through ``Progress.update(task, status=...)``."""
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn()]
    if with_status:
        columns.append(TextColumn("{task.fields[status]}"))
    columns.append(TimeElapsedColumn())
    return Progress(*columns, disable=not (enabled and sys.stderr.isatty()))
