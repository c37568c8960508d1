"""Progress display (rich) that the API can switch off: ``Progress(enabled=False)`` does nothing."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

console = Console(stderr=True)


class Progress:
    """``with progress.task("train", total=n) as update: update(advance, loss=...)``; ``progress.log(msg)``."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr is not None

    def log(self, message: str) -> None:
        if self.enabled:
            console.print(message, highlight=False)

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "items"):
        if not self.enabled:
            yield lambda advance=1, **fields: None
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        start = time.perf_counter()
        with RichProgress(*columns, console=console, transient=False) as bar:
            task_id = bar.add_task(description, total=total, info="")
            done = 0

            def update(advance: int = 1, **fields) -> None:
                nonlocal done
                done += advance
                rate = done / max(time.perf_counter() - start, 1e-9)
                info = "  ".join([f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
                                 + [f"{rate:,.0f} {unit}/s"])
                bar.update(task_id, advance=advance, info=info)

            yield update
