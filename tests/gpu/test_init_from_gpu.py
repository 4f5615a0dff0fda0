"""Continued pretraining on the GPU, fused kernels, bf16-mixed: a Mamba-130M-shaped model trained
here for a few steps is converted to a transformers directory (``export_hf``), then continued with
``recipe=mamba-130m init_from=<that directory> scheduler=wsd`` for a few hundred steps. The
continued run's step-0 validation loss (its model after strategy setup, before any update) equals
the source's, computed on the same validation batches by the same forward; the init guard has
checked every tensor bit for bit; the loss keeps falling."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from conftest import compose_config, metric_by_step
from mamba_train.formats.hf_export import export_hf
from mamba_train.formats.load import load_model
from mamba_train.train import train

pytestmark = pytest.mark.gpu

SOURCE_STEPS, CONTINUE_STEPS, VAL_BATCHES = 60, 300, 8
COMMON = ["recipe=mamba-130m", "data=default", "backend=fused", "data.seq_len=1024",
          "data.micro_batch_size=8", "train.global_batch_tokens=8192", "trainer.log_every_n_steps=10",
          f"trainer.limit_val_batches={VAL_BATCHES}", "logger=csv", "callbacks.progress_bar=null"]


@torch.no_grad()
def val_loss(model, loader, chunk_size: int) -> float:
    """Token-weighted mean loss over the first VAL_BATCHES batches, under bf16 autocast as in
    validation."""
    total, tokens = 0.0, 0
    for i, batch in enumerate(loader):
        if i == VAL_BATCHES:
            break
        ids, labels = batch["input_ids"].cuda(), batch["labels"].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=labels, loss_chunk_size=chunk_size).loss
        total += float(loss) * ids.numel()
        tokens += ids.numel()
    return total / tokens


class StepZeroValidation(L.Callback):
    def __init__(self, source):
        self.source = source

    def on_train_start(self, trainer, pl_module):
        loader = trainer.datamodule.val_dataloader()
        self.continued = val_loss(pl_module.model, loader, pl_module.loss_chunk_size)
        source = load_model(self.source, backend="fused")
        self.source_loss = val_loss(source, loader, pl_module.loss_chunk_size)
        del source


def test_continue_a_converted_model_on_the_fused_path(tmp_path, record):
    first = train(compose_config([*COMMON, "model.vocab_size=4096", "run_name=source",
                                  f"trainer.max_steps={SOURCE_STEPS}",
                                  "train.val_every_n_steps=100000"], tmp_path))
    hf_dir = export_hf(first["last_checkpoint"], tmp_path / "hf")  # the converted model
    probe = StepZeroValidation(hf_dir)
    second = train(compose_config([*COMMON, f"init_from={hf_dir}", "run_name=continued",
                                   "scheduler=wsd", "optim.lr=1e-3", "scheduler.warmup_steps=30",
                                   "scheduler.warmup_start_lr=1e-5",
                                   f"trainer.max_steps={CONTINUE_STEPS}",
                                   "train.val_every_n_steps=100"], tmp_path),
                   extra_callbacks=[probe])
    assert second["module"].loaded_weights is not None  # the guard verified the fingerprints
    losses = metric_by_step(second["run_dir"], "train/loss")
    vals = metric_by_step(second["run_dir"], "val/loss")
    steps = sorted(losses)
    record(f"init_from fused mamba-130m (converted to transformers): step-0 val loss "
           f"continued {probe.continued!r} source {probe.source_loss!r} "
           f"(equal: {probe.continued == probe.source_loss}); train loss step {steps[0]} "
           f"{losses[steps[0]]:.4f} -> step {steps[-1]} {losses[steps[-1]]:.4f}; val {vals}; "
           f"{second['trainer'].global_step} steps, {second['module'].training_step_mode}")
    assert probe.continued == pytest.approx(probe.source_loss, rel=1e-6, abs=1e-6)
    assert second["trainer"].global_step == CONTINUE_STEPS
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[steps[-1]] < losses[steps[0]]
