"""Kill the CLI anywhere and resume exactly; damaged checkpoints, signals, a diverged run, two
runs in one directory, bad values and a full disk each end in one clear line, nothing lost.

Every run is the real ``python -m mamba_train`` as a subprocess (through tests/helpers/
fault_cli.py, which injects the faults), compared with an uninterrupted run of the same seed:
the per-step losses must be equal as written (bit for bit on CPU), one row per step.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import faults

STEPS = 12
COMMON = [f"trainer.max_steps={STEPS}", "train.checkpoint_every_n_steps=3"]
SLOW_STEPS = {"step_sleep": 0.15}  # room to hit a given step; the numbers are unchanged


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]
    return proc


def _one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    assert "d_model:" not in proc.stdout + proc.stderr  # the resolved config is not printed
    return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple[int, str]]:
    """Losses of the uninterrupted run, as written to metrics.csv."""
    out = tmp_path_factory.mktemp("reference")
    _ok(faults.run(out, *COMMON))
    got = faults.losses(out / "debug")
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    return got


def test_kill9_at_a_random_step_then_last_resumes_exactly(tmp_path, reference):
    kill_after = random.Random(os.getpid()).randint(4, STEPS - 2)  # after >= 1 checkpoint
    run_dir = tmp_path / "debug"
    proc = faults.start(tmp_path, *COMMON, faults=SLOW_STEPS)
    faults.wait_for_step(proc, run_dir, kill_after)
    faults.kill(proc, signal.SIGKILL)
    proc.wait()
    before = faults.losses(run_dir)
    assert len(before) >= kill_after
    _ok(faults.run(tmp_path, *COMMON, "ckpt_path=last"))
    # one row per step, no duplicate, no gap; the rows from before the kill kept, same values
    assert faults.losses(run_dir) == reference, kill_after
    assert not list((run_dir / "checkpoints").glob("*-v*.ckpt"))


@pytest.mark.slow  # three runs, two killed inside ~1 s checkpoint writes
def test_kill9_while_checkpoints_are_written_leaves_only_loadable_files(tmp_path, reference):
    ckpt_dir = tmp_path / "debug" / "checkpoints"
    rng = random.Random(1)
    for attempt in range(2):  # each attempt resumes the previous one, killed mid-write
        proc = faults.start(tmp_path, *COMMON, "ckpt_path=last", faults={"slow_save": 1.0})
        faults.wait_for(lambda: faults.partials(ckpt_dir), proc, what="a checkpoint write")
        time.sleep(rng.uniform(0.0, 0.6))  # somewhere inside the ~1 s write
        faults.kill(proc, signal.SIGKILL)
        proc.wait()
        files = sorted(ckpt_dir.glob("*.ckpt"))
        assert all(faults.loads(f) for f in files), [f.name for f in files]
        if (ckpt_dir / "last.ckpt").exists():
            assert faults.loads(ckpt_dir / "last.ckpt")
    assert faults.partials(ckpt_dir)  # the kill left a partial write behind ...
    _ok(faults.run(tmp_path, *COMMON, "ckpt_path=last"))
    assert not faults.partials(ckpt_dir)  # ... which the resume removed
    assert faults.losses(tmp_path / "debug") == reference


def test_damaged_checkpoints_fall_back_to_the_newest_good_one_or_refuse(tmp_path):
    common = ["trainer.max_steps=6", "train.checkpoint_every_n_steps=2"]
    run_dir, ckpt_dir = tmp_path / "debug", tmp_path / "debug" / "checkpoints"
    _ok(faults.run(tmp_path, *common))
    (ckpt_dir / "last.ckpt").unlink()            # deleted
    faults.truncate(ckpt_dir / "step0000006.ckpt")  # cut short (a crash of another writer)
    proc = _ok(faults.run(tmp_path, "trainer.max_steps=8", "train.checkpoint_every_n_steps=2",
                          "ckpt_path=last"))
    out = proc.stdout + proc.stderr
    assert "skipping" in out and "step0000006.ckpt" in out and "Traceback" not in out
    assert "resuming from" in out and "step0000004.ckpt (step 4)" in out
    assert [s for s, _ in faults.losses(run_dir)] == list(range(1, 9))  # steps 5-8 redone, once
    assert faults.global_step(ckpt_dir / "last.ckpt") == 8
    assert not list(ckpt_dir.glob("*-v*.ckpt"))
    # every checkpoint unreadable: refuse in one line, never start over at step 0
    for f in ckpt_dir.glob("*.ckpt"):
        faults.scramble(f)
    rows_before = faults.rows(run_dir)
    proc = faults.run(tmp_path, "trainer.max_steps=10", "ckpt_path=last")
    _one_error_line(proc, "none of the", "loads", "Refusing", "run_name=")
    assert faults.rows(run_dir) == rows_before
    # an explicit ckpt_path at something that is not a checkpoint
    junk = tmp_path / "notes.ckpt"
    junk.write_text("not a checkpoint")
    _one_error_line(faults.run(tmp_path, "run_name=other", f"ckpt_path={junk}"),
                    f"ckpt_path={junk} is not a loadable checkpoint")


@pytest.mark.parametrize("sig, code", [
    pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
    pytest.param(signal.SIGINT, 130, id="SIGINT", marks=pytest.mark.slow),  # the same path
])
def test_signal_saves_at_the_next_step_exits_with_the_resume_command(tmp_path, reference, sig, code):
    run_dir = tmp_path / "debug"
    proc = faults.start(tmp_path, *COMMON, faults=SLOW_STEPS)
    faults.wait_for_step(proc, run_dir, 4)
    faults.kill(proc, sig)
    done = faults.finish(proc)
    assert done.returncode == code, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("stopped by"))
    assert line.startswith(f"stopped by {sig.name} after step ")
    step = int(line.split("after step ")[1].split(";")[0])
    assert step >= 5 and faults.global_step(run_dir / "checkpoints" / "last.ckpt") == step
    command = line.split("resume with: ")[1]
    assert command.startswith("python -m mamba_train ") and command.endswith("ckpt_path=last")
    argv = [sys.executable, "-m", "mamba_train", *shlex.split(command)[3:]]
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=faults._env({}),
                             cwd=faults.REPO)
    _ok(resumed)
    assert faults.losses(run_dir) == reference


def test_skip_policy_stops_a_diverged_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """Every loss from step 6 on (global_step 5) is NaN (weights blown up by an LR spike): the
    skips are warned about, the run stops after 3 in a row, and keep_last_k=1 still holds the
    step-4 state."""
    run_dir, ckpt_dir = tmp_path / "debug", tmp_path / "debug" / "checkpoints"
    proc = faults.run(tmp_path, *COMMON, "train.checkpoint_every_n_steps=2",
                      "train.keep_last_k_checkpoints=1", "module.nan_policy=skip",
                      "module.max_consecutive_skips=3", faults={"nan_loss_from": 5})
    _one_error_line(proc, "3 optimizer steps in a row were skipped (steps 6..8, first non-finite "
                    "in the loss itself", f"last checkpoint: {ckpt_dir / 'last.ckpt'}")
    out = proc.stdout + proc.stderr
    assert all(f"step {s} skipped" in out for s in (6, 7, 8))
    assert "not saving the step-6 checkpoint" in out
    assert sorted(f.name for f in ckpt_dir.glob("*.ckpt")) == ["last.ckpt", "step0000004.ckpt"]
    for f in ckpt_dir.glob("*.ckpt"):
        ckpt = torch.load(f, weights_only=False)
        assert ckpt["global_step"] == 4
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    logged = dict(faults.losses(run_dir))
    assert logged[5] != "nan" and logged[6] == logged[7] == "nan"  # each step's own loss, never a stale one


def test_a_second_run_in_the_same_directory_refuses_and_the_first_is_unharmed(tmp_path):
    run_dir, hold = tmp_path / "debug", tmp_path / "hold"
    hold.touch()  # the first run waits at step 1 until the second one has been refused
    first = faults.start(tmp_path, "trainer.max_steps=10", faults={"hold_while": hold})
    faults.wait_for_step(first, run_dir, 0)
    second = faults.run(tmp_path, "trainer.max_steps=10", "ckpt_path=last")
    hold.unlink()
    _one_error_line(second, f"{run_dir.resolve()} is in use by a running training (pid {first.pid}")
    _ok(faults.finish(first))
    assert [s for s, _ in faults.losses(run_dir)] == list(range(1, 11))


def test_bad_values_are_named_in_one_line_before_anything_is_written(tmp_path):
    proc = faults.run(tmp_path, "data.micro_batch_size=0", "data.seq_len=-4", "optim.lr=-1",
                      "trainer.max_steps=0")
    _one_error_line(proc, "data.micro_batch_size=0 must be", "data.seq_len=-4 must be",
                    "optim.lr=-1 must be", "trainer.max_steps=0 must be")
    assert not (tmp_path / "debug" / "checkpoints").exists()
    _one_error_line(faults.run(tmp_path, "data.seq_len=abc"), "data.seq_len='abc' must be a positive integer")


def test_full_disk_while_writing_a_checkpoint_is_one_line_and_resumable(tmp_path, reference):
    ckpt_dir = tmp_path / "debug" / "checkpoints"
    # saves: step0000003, last, step0000006 <- the disk is full from here
    proc = faults.run(tmp_path, *COMMON, faults={"enospc_at_save": 3})
    _one_error_line(proc, "no space left on the device while writing",
                    "step0000006.ckpt", "ckpt_path=last")
    assert not faults.partials(ckpt_dir)
    assert faults.global_step(ckpt_dir / "last.ckpt") == 3  # the files before it are intact
    _ok(faults.run(tmp_path, *COMMON, "ckpt_path=last"))
    assert faults.losses(tmp_path / "debug") == reference


@pytest.mark.slow  # the ENOSPC injection test covers the same path by default
def test_full_tmpfs_while_writing_a_checkpoint(tmp_path):
    """The same with a real full filesystem: a 4 MiB tmpfs (root only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root here; the ENOSPC injection test covers the path")
    try:
        proc = faults.run(mnt, "trainer.max_steps=8", "train.checkpoint_every_n_steps=1",
                          "train.keep_last_k_checkpoints=-1")
        _one_error_line(proc, "no space left on the device while writing")
        ckpt_dir = mnt / "debug" / "checkpoints"
        assert not faults.partials(ckpt_dir)
        assert all(faults.loads(f) for f in ckpt_dir.glob("*.ckpt"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_stale_partials_and_orphan_step_files_are_cleaned_on_resume(tmp_path):
    run_dir, ckpt_dir = tmp_path / "debug", tmp_path / "debug" / "checkpoints"
    common = ["train.checkpoint_every_n_steps=2", "train.keep_last_k_checkpoints=2"]
    _ok(faults.run(tmp_path, "trainer.max_steps=6", *common))
    good = (ckpt_dir / "step0000004.ckpt").read_bytes()
    for orphan in ("step0000001.ckpt", "step0000002.ckpt"):  # left by earlier interrupted runs
        (ckpt_dir / orphan).write_bytes(good)
    (ckpt_dir / ".step0000008.ckpt.x1y2z3.tmp").write_bytes(good[:1000])
    proc = _ok(faults.run(tmp_path, "trainer.max_steps=8", *common, "ckpt_path=last"))
    assert "partial write of an interrupted run" in proc.stdout + proc.stderr
    assert not faults.partials(ckpt_dir)
    assert sorted(f.name for f in ckpt_dir.glob("step*.ckpt")) == ["step0000006.ckpt", "step0000008.ckpt"]
    assert [s for s, _ in faults.losses(run_dir)] == list(range(1, 9))


@pytest.mark.parametrize("overrides, expected", [
    (["optim.lrr=1e-3"], "optim.lrr is not a key of the config. Did you mean optim.lr? To add a new "
                         "key anyway: +optim.lrr=1e-3"),
    (["data.seq_length=64"], "Did you mean data.seq_len?"),
    (["strategy=megatron"], "In 'config': Could not find 'strategy/megatron'. Available options in "
                            "'strategy': auto, ddp, deepspeed_zero1"),
    (["recipe=mamba-9000"], "Could not find 'recipe/mamba-9000'"),
    (["paths.output_dir=/tmp/a=b"], "cannot parse the override 'paths.output_dir=/tmp/a=b'"),
])
def test_an_override_hydra_cannot_apply_is_one_line(overrides, expected):
    """Hydra's own report is several lines and a pointer to HYDRA_FULL_ERROR."""
    from mamba_train.cli.compose import OverrideError, compose

    with pytest.raises(OverrideError) as e:
        compose(["recipe=debug", *overrides])
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_bad_override_is_one_line_through_the_cli(tmp_path):
    proc = faults.run(tmp_path, "optim.lrr=1e-3", timeout=120)
    _one_error_line(proc, "optim.lrr is not a key of the config. Did you mean optim.lr?")
    assert "HYDRA_FULL_ERROR" not in proc.stderr and not (tmp_path / "debug").exists()
