"""On the GPU: the first step's kernel warm-up is announced and timed, the model summary names the
fused backend, and the text samples run on the fused kernels (under the validation precision)."""

import json
import logging

import pytest

from conftest import compose_config
from mamba_train.train import train

pytestmark = pytest.mark.gpu


def test_fused_run_announces_and_times_the_first_step(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mamba_train")
    cfg = compose_config(["recipe=debug-mamba2", "backend=fused", "data.seq_len=512",
                          "data.micro_batch_size=4", "train.global_batch_tokens=2048",
                          "trainer.max_steps=4", "trainer.log_every_n_steps=2",
                          "train.val_every_n_steps=4", "trainer.limit_val_batches=1",
                          "logger=csv", "callbacks.progress_bar.mode=lines"], tmp_path)
    result = train(cfg)
    text = caplog.text
    assert "compiling/autotuning kernels for the first step" in text
    assert "backend: fused" in text and "mixers: Mamba2 x 4" in text
    assert "step 4/4 | loss" in text and "tok/s" in text and "MFU: " in text  # peak, or how to set it
    assert "samples at step 4" in text
    summary = json.loads((result["run_dir"] / "summary.json").read_text())
    assert summary["time_to_first_step_s"] > 0
