"""A CSV logger that survives resumes.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when a run restarts in the same directory, so
after a requeue the file (and the loss plot and summary built from it) would cover only the part
after the resume. Here the previous rows are kept, and when training resumes from step k the rows
logged at steps >= k by the interrupted attempt are dropped (those steps are being redone), so the
file reads as one uninterrupted run. Every logged row is appended at once (a killed run keeps
all rows it logged: ``flush_logs_every_n_steps=1``), and the rewrites (a new column, a prune) go to a
temporary file renamed over the old one, so a kill mid-rewrite cannot truncate the file; a row
cut short by a kill mid-append is dropped at the next start.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mamba_train.fileio import atomic_write


class _KeepingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def prune_from_step(self, step: int) -> None:
        self.save()
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if _row_step(r, len(keys)) is not None
                    and _row_step(r, len(keys)) < step]
        self._write_all(keys, rows)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning's version rewrites the file in place; a kill in the middle would lose it
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        self._write_all(fieldnames, rows)

    def _write_all(self, keys: list[str], rows: list[dict]) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(self.metrics_file_path, write)


def _row_step(row: dict, n_keys: int) -> int | None:
    """The row's step, or None for a row cut short by a kill mid-write (too few fields)."""
    if len(row) != n_keys or None in row.values() or None in row:
        return None
    try:
        return int(float(row["step"]))
    except (KeyError, TypeError, ValueError):
        return None


class ResumableCSVLogger(CSVLogger):
    def __init__(self, *args, flush_logs_every_n_steps: int = 1, **kwargs):
        # rows are written when logged (Lightning's default holds 100 steps in memory: a kill
        # would lose rows of steps that a checkpoint already covers, a gap after the resume)
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def prune_from_step(self, step: int) -> None:
        """Drop rows logged at steps >= ``step`` (called when training resumes from ``step``)."""
        self.experiment.prune_from_step(step)
