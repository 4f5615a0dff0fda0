"""``train/global_loss``: the mean training loss of each optimizer step over the whole global
batch (every micro-batch of the accumulation window, every rank).

``train/loss`` is this rank's mean over its micro-batches of the step, so its noise and its
samples depend on the world size. ``train/global_loss`` is the same quantity whatever the
layout: 1 process × accumulation 2 and 2 processes × accumulation 1 see the same global samples
per step (the loader deals global sample ``i`` to rank ``i % world_size``) and report the same
number. Costs one scalar all-reduce per optimizer step when world size > 1.
"""

from __future__ import annotations

import lightning as L

from mamba_train.training.lightning_compat import log_metrics
from mamba_train.training.step.train_step import step_ended


class GlobalBatchLoss(L.Callback):
    def __init__(self, name: str = "train/global_loss"):
        self.name = name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                           batch, batch_idx: int) -> None:
        ended = step_ended(pl_module)
        if ended is None:
            return
        value = ended.loss.float()
        if trainer.world_size > 1:  # every rank joins, every step
            value = trainer.strategy.reduce(value, reduce_op="mean")
        every = max(1, trainer.log_every_n_steps)
        if ended.number % every == 0 or ended.number == trainer.max_steps:
            log_metrics(trainer, {self.name: value}, step=ended.number)
