"""A kill inside the validation of a checkpoint step, and a resume that runs no step: the resumed
run's metrics and summary.json read as those of the uninterrupted run.

Every run is the real CLI (tests/helpers/fault_cli.py); validation and checkpoints share their
cadence, as in the recipes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import faults

sys.path.insert(0, str(Path(__file__).parent))
from test_reliability_cli import _ok  # noqa: E402

CADENCE = ["trainer.max_steps=6", "train.checkpoint_every_n_steps=3", "train.val_every_n_steps=3"]


def _val_rows(run_dir: Path) -> list[tuple[int, str]]:
    return [(int(float(r["step"])), r["val/loss"]) for r in faults.rows(run_dir) if r.get("val/loss")]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow  # three CLI runs, one killed
def test_a_kill_inside_the_last_validation_is_validated_again_on_resume(tmp_path):
    ref_dir, run_dir = tmp_path / "ref" / "debug", tmp_path / "run" / "debug"
    _ok(faults.run(tmp_path / "ref", *CADENCE))
    reference = _val_rows(ref_dir)
    assert [s for s, _ in reference] == [3, 6]

    killed = faults.run(tmp_path / "run", *CADENCE, faults={"kill_in_val_at": 6})
    assert killed.returncode == -9, killed.stderr[-3000:]
    _ok(faults.run(tmp_path / "run", *CADENCE, "ckpt_path=last"))
    # the validation of step 6 ran (once), with the values of the uninterrupted run
    assert _val_rows(run_dir) == reference
    assert faults.losses(run_dir) == faults.losses(ref_dir)
    summary, expected = _summary(run_dir), _summary(ref_dir)
    assert summary["final_val_loss_step"] == 6
    assert summary["final_val_loss"] == expected["final_val_loss"]
    assert faults.global_step(run_dir / "checkpoints" / "last.ckpt") == 6


@pytest.mark.slow  # two CLI runs
def test_a_resume_that_runs_no_step_keeps_the_runs_time_and_step_kind(tmp_path):
    """The run ended (its last checkpoint written) but was killed before summary.json: the
    resume finds max_steps reached and runs no step; the summary still counts the training time
    and says how the steps ran, not "training has not started"."""
    run_dir = tmp_path / "debug"
    _ok(faults.run(tmp_path, *CADENCE, faults={"step_sleep": 0.2}))
    first = _summary(run_dir)
    assert first["wall_time_s"] >= 6 * 0.2
    (run_dir / "summary.json").unlink()
    _ok(faults.run(tmp_path, *CADENCE, "ckpt_path=last"))
    summary = _summary(run_dir)
    assert summary["steps"] == 6
    assert summary["wall_time_s"] >= 6 * 0.2, summary
    assert summary["training_step"] == first["training_step"]
    assert "not started" not in summary["training_step"]
    assert summary["time_to_first_step_s"] == first["time_to_first_step_s"]
