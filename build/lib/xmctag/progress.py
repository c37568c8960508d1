"""Progress display (rich) that the API can switch off: ``Progress(enabled=False)`` does nothing."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

console = Console(stderr=True)
LOG_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


class Progress:
    """``with progress.task("train", total=n) as update: update(advance, loss=...)``; ``progress.log(msg)``."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr is not None

    def log(self, message: str) -> None:
        if self.enabled:
            console.print(message, highlight=False, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "items"):
        if not self.enabled:
            yield lambda advance=1, **fields: None
            return
        if not console.is_terminal:  # a log file (cron): a plain line every LOG_EVERY seconds and at the end
            yield from self._log_lines(description, total, unit)
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

    def _log_lines(self, description: str, total: int | None, unit: str):
        start = last = time.perf_counter()
        done = 0
        fields_now: dict = {}

        def line() -> str:
            elapsed = time.perf_counter() - start
            info = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields_now.items())
            return (f"{description}: {done}/{total if total is not None else '?'} {unit}, {elapsed:.0f}s, "
                    f"{done / max(elapsed, 1e-9):,.0f} {unit}/s  {info}").rstrip()

        def update(advance: int = 1, **fields) -> None:
            nonlocal done, last
            done += advance
            fields_now.update(fields)
            if time.perf_counter() - last >= LOG_EVERY:
                last = time.perf_counter()
                self.log(line())

        yield update
        self.log(line())
