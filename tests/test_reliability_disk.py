"""A full disk at the end of a run or on the way: the metrics file keeps whole rows and the run
stops in one line, the plot and the log fail with one warning, never a traceback per record;
files a run reads back (metrics.csv, wandb_run_id) that hold junk are one line naming them."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path

import pytest

from helpers import faults

sys.path.insert(0, str(Path(__file__).parent))
from test_reliability_cli import _ok  # noqa: E402


def _enospc_after(nbytes: int):
    real = os.write

    def write(fd, data):
        real(fd, bytes(data)[:nbytes])  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def test_full_disk_while_appending_metrics_keeps_whole_rows_and_is_one_error(tmp_path, monkeypatch):
    from mamba_train.fileio import DiskFullError
    from mamba_train.training.run.csv_logger import ResumableCSVLogger

    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="metrics", version="")
    logger.log_metrics({"train/loss": 2.5}, step=0)
    before = (Path(logger.log_dir) / "metrics.csv").read_text()
    monkeypatch.setattr(os, "write", _enospc_after(3))
    with pytest.raises(DiskFullError, match="no space left on the device while writing .*metrics.csv"):
        logger.log_metrics({"train/loss": 2.25}, step=1)
    monkeypatch.undo()
    assert (Path(logger.log_dir) / "metrics.csv").read_text() == before  # no half row
    logger.finalize("failed")  # the teardown's flush has nothing left to fail on
    assert (Path(logger.log_dir) / "metrics.csv").read_text() == before


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", b"name,value\nfoo,1\n"])
def test_a_metrics_file_that_is_not_csv_text_is_one_line(tmp_path, content):
    from mamba_train.training.run.csv_logger import MetricsFileError, ResumableCSVLogger

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "metrics.csv").write_bytes(content)
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="metrics", version="")
    with pytest.raises(MetricsFileError, match=r"metrics\.csv is not a metrics CSV file .*move it away"):
        logger.prune_from_step(0)
    assert (tmp_path / "metrics" / "metrics.csv").read_bytes() == content


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x01", b"abc def\n../../x"])
def test_a_wandb_run_id_file_that_is_not_an_id_is_one_line(tmp_path, content):
    from mamba_train.training.run.loggers import RunIdFileError, resolve_run_id

    (tmp_path / "wandb_run_id").write_bytes(content)
    with pytest.raises(RunIdFileError, match="wandb_run_id does not hold a W&B run id"):
        resolve_run_id(tmp_path, resume=True)
    (tmp_path / "wandb_run_id").write_text("a1b2c3d4\n")
    assert resolve_run_id(tmp_path, resume=True) == "a1b2c3d4"


class _FullDisk:
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass

    def close(self):
        pass


def test_a_log_that_cannot_be_written_warns_once_and_the_run_goes_on(tmp_path, capfd):
    from mamba_train.training.run.run_lock import lock_run_dir, unlock_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    handler = logging.FileHandler(run_dir / "train.log")
    log = logging.getLogger("mamba_train.test_full_log")
    log.addHandler(handler)
    try:
        lock_run_dir(run_dir)
        handler.stream.close()
        handler.stream = _FullDisk()
        for i in range(5):
            log.warning("record %d", i)
    finally:
        unlock_run_dir(run_dir)
        log.removeHandler(handler)
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert err.count("warning: cannot write the log") == 1 and "No space left on device" in err
    assert handler not in log.handlers


def test_full_disk_while_saving_the_plot_still_writes_the_summary(tmp_path):
    """Training finished and its checkpoints are saved: a failed plot is one warning, exit 0,
    no 0-byte or partial loss.png, and summary.json is written."""
    run_dir = tmp_path / "debug"
    proc = _ok(faults.run(tmp_path, "trainer.max_steps=2", faults={"enospc_plot": 1}))
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "no loss plot: no space left on the device" in out
    assert not (run_dir / "loss.png").exists() and not list(run_dir.glob(".loss.png.*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["plot"] is None and summary["final_train_loss"] > 0
