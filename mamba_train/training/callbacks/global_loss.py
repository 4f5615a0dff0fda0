"""``train/global_loss``: the mean training loss of each optimizer step over the whole global
batch (every micro-batch of the accumulation window, every rank).

``train/loss`` (logged in ``training_step``) is the loss of the *last micro-batch on rank 0*, so
its noise and its samples depend on the world size and the accumulation. ``train/global_loss``
is the same quantity whatever the layout: 1 process × accumulation 2 and 2 processes ×
accumulation 1 see the same global samples per step (the loader deals global sample ``i`` to
rank ``i % world_size``) and report the same number. Costs one scalar all-reduce per optimizer
step when world size > 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch


class GlobalBatchLoss(L.Callback):
    def __init__(self, name: str = "train/global_loss"):
        self.name = name
        self._sum: torch.Tensor | None = None  # sum of Lightning's 1/accumulation-scaled losses
        self._seen = 0
        self._total = 0
        self._last_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step, self._sum, self._seen, self._total = trainer.global_step, None, 0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                           batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self._total += 1
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float()
            self._sum = loss if self._sum is None else self._sum + loss
            self._seen += 1
        if trainer.global_step == self._last_step:
            return  # inside the accumulation window
        self._last_step = trainer.global_step
        if self._sum is None:
            value = torch.tensor(float("nan"), device=pl_module.device)
        else:
            # Lightning divided each micro-batch loss by the window size; skipped (non-finite)
            # micro-batches returned None, so rescale to the mean over those that counted.
            value = self._sum * (self._total / self._seen)
        if trainer.world_size > 1:
            value = trainer.strategy.reduce(value, reduce_op="mean")
        pl_module.log(self.name, value, on_step=True, on_epoch=False, prog_bar=False,
                      batch_size=1, sync_dist=False)
        self._sum, self._seen, self._total = None, 0, 0
