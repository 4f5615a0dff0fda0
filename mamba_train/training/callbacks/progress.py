"""Rich progress bar that knows the step budget (so it shows an ETA on a streaming dataset, whose
length is unknown) and shows global tokens/s beside the loss."""

from __future__ import annotations

import math
import time

from lightning.pytorch.callbacks import RichProgressBar


class TokenProgressBar(RichProgressBar):
    def __init__(self, smoothing: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        self.smoothing = smoothing
        self._last_time: float | None = None
        self._tokens_per_s: float | None = None

    @property
    def total_train_batches(self):
        total = super().total_train_batches
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            budget = trainer.max_steps * trainer.accumulate_grad_batches
            if total is None or math.isinf(total) or budget < total:
                return budget
        return total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._last_time is not None and isinstance(batch, dict) and "input_ids" in batch:
            rate = batch["input_ids"].numel() * trainer.world_size / max(now - self._last_time, 1e-9)
            s = self.smoothing
            self._tokens_per_s = rate if self._tokens_per_s is None else s * self._tokens_per_s + (1 - s) * rate
        self._last_time = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if self._tokens_per_s is not None:
            items["tok/s"] = f"{self._tokens_per_s:,.0f}"
        return items
