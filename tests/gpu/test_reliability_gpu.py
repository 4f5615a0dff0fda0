"""On the GPU: the captured training step masks a non-finite gradient on the device (no host
sync), and FSDP / DeepSpeed train on one GPU (the init check's gathering under NO_SHARD).

    python -m pytest -q tests/gpu/test_reliability_gpu.py
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from mamba_train.train import train
from mamba_train.training.step.nonfinite import NonFiniteGuard, NonFiniteLossError
from test_reliability import PoisonGradientAt, _assert_same

pytestmark = pytest.mark.gpu
REPO = Path(__file__).parents[2]
GRAPH = ["recipe=debug-mamba2", "backend=fused", "data.seq_len=256", "data.micro_batch_size=4",
         "train.global_batch_tokens=1024", "trainer.max_steps=8", "module.cuda_graph=on",
         "optim.optimizer.fused=true", "trainer.log_every_n_steps=4", "logger=csv",
         "trainer.limit_val_batches=1", "train.val_every_n_steps=1000", "data.num_workers=0",
         "train.checkpoint_every_n_steps=4"]


@pytest.fixture
def no_sync_in_the_decision(monkeypatch):
    """Any host synchronisation inside the guard's per-step decision raises."""
    original = NonFiniteGuard.before_optimizer_step

    def checked(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(NonFiniteGuard, "before_optimizer_step", checked)


def test_captured_step_skips_a_non_finite_gradient_on_the_device(tmp_path, no_sync_in_the_decision,
                                                                 record):
    poison = PoisonGradientAt(5)  # after the 3 eager warm-up steps and the capture
    result = train(compose_config([*GRAPH, "module.nan_policy=skip"], tmp_path), extra_callbacks=[poison])
    module = result["module"]
    assert module.graph_step is not None and module.graph_step.replays >= 4, module.training_step_mode
    _assert_same(poison.before, poison.after)  # weights and AdamW state of step 6 untouched
    assert module.skipped_steps == 1 and result["trainer"].global_step == 8
    assert all(torch.isfinite(p).all() for p in module.parameters())
    record(f"reliability: captured step ({module.training_step_mode}) skipped the non-finite "
           "step 6 on the device, weights and optimizer state unchanged")


def test_captured_step_stop_names_the_step(tmp_path, no_sync_in_the_decision):
    poison = PoisonGradientAt(5)
    with pytest.raises(NonFiniteLossError, match="at step 6, in backbone"):  # global_step 5 -> 6
        train(compose_config(GRAPH, tmp_path), extra_callbacks=[poison])
    ckpts = sorted(p.name for p in (tmp_path / "debug-mamba2" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step0000004.ckpt"]
    _assert_same(poison.before[0], poison.after[0])


@pytest.mark.parametrize("strategy", [
    pytest.param(["strategy=fsdp"], id="fsdp"),
    pytest.param(["strategy=fsdp", "strategy.state_dict_type=sharded"], id="fsdp-sharded"),
    pytest.param(["strategy=deepspeed_zero2"], id="deepspeed_zero2"),
    pytest.param(["strategy=deepspeed_zero3"], id="deepspeed_zero3"),
])
def test_one_gpu_sharded_strategies_train_and_check_the_init(tmp_path, strategy, record):
    if "deepspeed" in strategy[0] and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed on this machine")
    cmd = [sys.executable, "-m", "mamba_train", "recipe=debug-mamba2", "backend=fused",
           "trainer.devices=1", *strategy, "trainer.max_steps=4", "train.checkpoint_every_n_steps=2",
           "trainer.limit_val_batches=1", "train.val_every_n_steps=1000", "logger=csv",
           f"paths.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "SSM init check passed" in out and "NotImplementedError" not in out
    assert "training done: 4 steps" in proc.stdout
    # and it resumes
    proc = subprocess.run([*cmd[:-1], "trainer.max_steps=6", "ckpt_path=last", cmd[-1]],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "training done: 6 steps" in proc.stdout
    record(f"reliability: 1-GPU {' '.join(strategy)} trained 4 steps, init check passed, resumed to 6")
