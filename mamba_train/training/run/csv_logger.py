"""A CSV logger that survives resumes.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when a run restarts in the same directory, so
after a requeue the file (and the loss plot and summary built from it) would cover only the part
after the resume. Here the previous rows are kept, and when training resumes from step k the rows
logged at steps >= k by the interrupted attempt are dropped (those steps are being redone), so the
file reads as one uninterrupted run. Every logged row is appended at once (a killed run keeps
all rows it logged: ``flush_logs_every_n_steps=1``), and the rewrites (a new column, a prune) go to a
temporary file renamed over the old one, so a kill mid-rewrite cannot truncate the file; a row
cut short by a kill mid-append is dropped at the next start.

A row is appended with one ``write`` of the whole line; when that fails (a full disk) the file
is cut back to its last complete row and the run stops with one line naming the file (the
checkpoints are intact: ``ckpt_path=last`` resumes). A ``metrics.csv`` that is not a CSV text
file (binary junk) is refused in one line instead of being read or rewritten.
"""

from __future__ import annotations

import csv
import io
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from pathlib import Path

from mamba_train.errors import MambaTrainError
from mamba_train.fileio import _is_disk_full, atomic_write, disk_full_error


class MetricsFileError(MambaTrainError, ValueError):
    """``metrics.csv`` is not a CSV file this logger can continue."""


def _read(path: str) -> tuple[list[str], list[dict]]:
    """Header and rows, or one line naming the file when it is not CSV text."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        problem = f"{type(e).__name__}: {str(e)[:80]}"
    else:
        if not keys or "step" in keys:
            return keys, rows
        problem = "no step column"  # pruning by step would drop every row
    raise MetricsFileError(
        f"{path} is not a metrics CSV file ({problem}); move it away (a resumed run starts a "
        "new one) or start a new run with run_name=<new name>")


class _KeepingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            self.metrics_keys = _read(self.metrics_file_path)[0]

    def prune_from_step(self, step: int) -> None:
        self.save()
        if not os.path.isfile(self.metrics_file_path):
            return
        keys, rows = _read(self.metrics_file_path)
        self._write_all(keys, [r for r in rows if _row_step(r, len(keys)) is not None
                               and _row_step(r, len(keys)) < step])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning's version rewrites the file in place; a kill in the middle would lose it
        self._write_all(fieldnames, _read(self.metrics_file_path)[1])

    def save(self) -> None:
        """Append the pending rows in one write; a failed write leaves only complete rows."""
        if not self.metrics:
            return
        if "file" not in self._fs.protocol:  # a remote filesystem: Lightning's own writer
            return super().save()
        new_keys = self._record_new_keys()
        if new_keys or not os.path.isfile(self.metrics_file_path):
            self._write_all(self.metrics_keys, _read(self.metrics_file_path)[1]
                            if os.path.isfile(self.metrics_file_path) else [])
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.metrics_keys).writerows(self.metrics)
        data = buf.getvalue().encode()
        fd = os.open(self.metrics_file_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
            except OSError as e:
                written = e
            if not isinstance(written, int) or written != len(data):
                os.ftruncate(fd, size)  # no half row: the file ends with its last whole one
                self.metrics = []  # unwritable; the teardown's flush must not fail a second time
                if isinstance(written, int) or _is_disk_full(written):
                    raise disk_full_error(Path(self.metrics_file_path)) from None
                raise written
        finally:
            os.close(fd)
        self.metrics = []

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
