"""What ``prepare`` shows while it runs: a live line on a terminal, log lines otherwise.

Under ``sbatch``/``nohup`` (stderr not a terminal) Rich's live display prints nothing until the
end and then one line cut to the console width; there, as the training CLI does, a dated line
goes out every ``every_s`` seconds (and at the end), whole.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from datetime import datetime, timedelta


class _Lines:
    """The subset of ``rich.progress.Progress`` that ``prepare`` uses, as log lines."""

    def __init__(self, every_s: float, stream):
        self.every_s, self.stream = every_s, stream
        self.tasks: dict[int, dict] = {}
        self.t0 = self.last = time.monotonic()

    def add_task(self, description: str, **fields) -> int:
        self.tasks[len(self.tasks)] = {"description": description, **fields}
        return len(self.tasks) - 1

    def update(self, task: int, **fields) -> None:
        self.tasks[task].update(fields)
        if time.monotonic() - self.last >= self.every_s:
            self.emit(task)

    def emit(self, task: int) -> None:
        self.last = time.monotonic()
        t = self.tasks[task]
        elapsed = timedelta(seconds=int(self.last - self.t0))
        print(f"[{datetime.now():%Y-%m-%d %H:%M:%S}] {t['description']}: {t.get('docs', 0):,} docs"
              f" | {t.get('tokens', 0):,} tokens | {t.get('rate', 0.0):,.0f} tokens/s | "
              f"elapsed {elapsed}", file=self.stream, flush=True)


@contextmanager
def progress_display(console, every_s: float = 30.0):
    """A Rich spinner line on a terminal; elsewhere a line every ``every_s`` s and one at the end."""
    if console.is_terminal:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"),
                      TextColumn("{task.fields[docs]:,} docs"), TextColumn("{task.fields[tokens]:,} tokens"),
                      TextColumn("{task.fields[rate]:,.0f} tokens/s"), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            yield bar
        return
    lines = _Lines(every_s, console.file if console.file is not None else sys.stderr)
    try:
        yield lines
    finally:
        for task in lines.tasks:
            lines.emit(task)
