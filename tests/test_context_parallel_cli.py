"""``strategy=fsdp2 strategy.context_parallel_size=2`` through the real CLI (2 gloo processes,
reference backend, fp32): the loss trajectory equals one process on whole sequences, and a
checkpoint written under CP=2 resumes in one process (CP=1) onto the same trajectory.

The two runs see the same windows in the same order (the loader deals windows over the
data-parallel ranks only, one here), so only fp32 summation order differs: 1e-4 per step is
asserted (the tolerance of the other strategies' trajectory tests, tests/test_distributed.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import TINY, compose_config, metric_by_step
from mamba_train.train import train

STEPS = 10
RUN = [*TINY, "recipe=debug-mamba2", "backend=reference", f"trainer.max_steps={STEPS}",
       "trainer.limit_val_batches=2", "train.val_every_n_steps=1000", "logger=csv",
       "trainer.accelerator=cpu", "train.checkpoint_every_n_steps=5",
       "train.keep_last_k_checkpoints=-1"]
CP2 = ["trainer.devices=2", "strategy=fsdp2", "strategy.context_parallel_size=2"]


def _cli(out, *overrides):
    cmd = [sys.executable, "-m", "mamba_train", *RUN, *overrides, f"paths.output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n" + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    result = train(compose_config([*RUN, "trainer.devices=1", "run_name=one"], out))
    return result["run_dir"]


def _close(ref: dict, got: dict, steps) -> None:
    assert sorted(got) == list(steps), got
    for s in steps:
        assert got[s] == pytest.approx(ref[s], abs=1e-4), (s, ref, got)


@pytest.mark.slow
def test_cp2_cli_matches_one_process_and_resumes_on_cp1(one_process, tmp_path):
    ref = metric_by_step(one_process, "train/global_loss")
    _cli(tmp_path, *CP2, "run_name=cp2")
    _close(ref, metric_by_step(tmp_path / "cp2", "train/global_loss"), range(1, STEPS + 1))
    mid = tmp_path / "cp2" / "checkpoints" / "step0000005.ckpt"
    assert mid.is_file()  # one ordinary checkpoint, gathered on rank 0
    _cli(tmp_path, "trainer.devices=1", "run_name=resumed", f"ckpt_path={mid}")
    _close(ref, metric_by_step(tmp_path / "resumed", "train/global_loss"), range(6, STEPS + 1))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_cp2(one_process, tmp_path):
    mid = one_process / "checkpoints" / "step0000005.ckpt"
    _cli(tmp_path, *CP2, "run_name=resumed", f"ckpt_path={mid}")
    _close(metric_by_step(one_process, "train/global_loss"),
           metric_by_step(tmp_path / "resumed", "train/global_loss"), range(6, STEPS + 1))


def test_fsdp2_config_composes_and_refuses_a_zero_size(tmp_path):
    from mamba_train.training.step.strategies.fsdp2 import fsdp2_strategy
    from mamba_train.training.step.strategies.policy import ParallelConfigError

    with pytest.raises(ParallelConfigError, match="context_parallel_size must be >= 1"):
        fsdp2_strategy(context_parallel_size=0)
    cfg = compose_config(["strategy=fsdp2", "strategy.context_parallel_size=4"], tmp_path)
    assert cfg.strategy.context_parallel_size == 4


@pytest.mark.slow
def test_data_times_context_parallel_mesh_matches_one_process(one_process, tmp_path):
    """Four processes as a (data_parallel=2, context_parallel=2) mesh: each data-parallel pair
    takes half of every step's windows (micro-batch 2 instead of 4), each rank a slice of them;
    the trajectory is the one process's."""
    _cli(tmp_path, "trainer.devices=4", "strategy=fsdp2", "strategy.context_parallel_size=2",
         "data.micro_batch_size=2", "run_name=dp2cp2", "train.checkpoint_every_n_steps=1000")
    _close(metric_by_step(one_process, "train/global_loss"),
           metric_by_step(tmp_path / "dp2cp2", "train/global_loss"), range(1, STEPS + 1))
