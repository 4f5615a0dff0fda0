"""``init_from`` under 2-process strategies on CPU (gloo), through the real CLI: after strategy
setup every rank holds the source's tensors bit for bit (the init guard compares fingerprints of
the full, gathered parameters on every rank and logs it) and training proceeds. See
test_distributed.py for how the multi-process CPU runs work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_distributed import has_deepspeed
from test_init_from import RUN, hf_model, save_hf



@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    pytest.param(["strategy=ddp"], id="ddp"),
    pytest.param(["strategy=fsdp"], id="fsdp-full"),
    pytest.param(["strategy=fsdp", "strategy.state_dict_type=sharded",
                  "module.activation_checkpointing=all"], id="fsdp-sharded"),
    pytest.param(["strategy=deepspeed_zero1", "strategy.allow_cpu=true"], id="zero1", marks=has_deepspeed),
    pytest.param(["strategy=deepspeed_zero2", "strategy.allow_cpu=true"], id="zero2", marks=has_deepspeed),
    pytest.param(["strategy=deepspeed_zero3", "strategy.allow_cpu=true"], id="zero3", marks=has_deepspeed),
])
def test_loaded_weights_survive_strategy_setup_on_every_rank(strategy, tmp_path):
    model = hf_model("mamba2")
    src = save_hf(model, tmp_path / "src")
    n = len({id(p) for p in model.parameters()})
    cmd = [sys.executable, "-m", "mamba_train", *RUN, "trainer.devices=2", "trainer.max_steps=2",
           "train.global_batch_tokens=512", *strategy, f"init_from={src}", "run_name=two",
           f"paths.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n" + proc.stderr[-6000:]
    run_dir = tmp_path / "two"
    logs = [(run_dir / "mamba-train.log").read_text(), (run_dir / "train_ddp_process_1.log").read_text()]
    for rank, text in enumerate(logs):
        assert (f"loaded weights preserved: {n} tensors bit-identical to {src} on rank {rank}"
                in text), text[-3000:]
        assert "SSM init check" not in text
    assert "training done: 2 steps" in proc.stdout
