"""Two gloo processes through the real CLI print one console: rank 0's run information, step
and validation lines once; the other rank's lines go to its own log file only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = ["recipe=debug", "model.d_model=32", "model.n_layer=1", "data.seq_len=32",
       "data.micro_batch_size=2", "train.global_batch_tokens=128", "data.num_workers=0",
       "trainer.max_steps=4", "trainer.limit_val_batches=2", "train.val_every_n_steps=2",
       "train.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1", "logger=csv",
       "trainer.accelerator=cpu", "trainer.devices=2", "strategy=ddp", "callbacks.samples=null"]


@pytest.mark.slow  # two processes, ~30 s on 2 cores
def test_two_processes_print_each_line_once(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mamba_train", *RUN, f"paths.output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = out.splitlines()

    def count(text: str) -> int:
        return sum(text in line for line in lines)

    for once in ("run dir:", "model summary:", "mixer backend", "training starts at step",
                 "Seed set to", "SSM init check passed", "] step 1/4 |", "] step 4/4 |",
                 "val  step 2/4 |", "val  step 4/4 |", "run summary", "training done"):
        assert count(once) == 1, (once, out[-4000:])
    assert "rank: 1" not in out and "GLOBAL_RANK: 1" not in out and "on rank 1" not in out
    assert "sync_dist" not in out  # validation metrics are logged with the sync Lightning expects
    # rank 1 still writes its own lines to its log file
    rank1 = (tmp_path / "debug" / "train_ddp_process_1.log").read_text()
    assert "SSM init check passed for 1 mixers on rank 1" in rank1
    assert "training starts at step 0 (rank 1)" in rank1
